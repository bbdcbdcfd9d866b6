from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway import secrets
from gateway.errors import SecretError
from gateway.secrets import EnvSecret, FileSecret, LiteralSecret


def test_env_secret(monkeypatch):
    monkeypatch.setenv("GW_TEST_KEY", "value-from-env-123")
    secret = EnvSecret("GW_TEST_KEY")
    assert secret.value == "value-from-env-123"
    assert "value-from-env" not in repr(secret)
    monkeypatch.delenv("GW_TEST_KEY")
    with pytest.raises(SecretError, match="GW_TEST_KEY is not set"):
        EnvSecret("GW_TEST_KEY")


def test_literal_secret_repr():
    secret = LiteralSecret("literal-value-123")
    assert secret.value == "literal-value-123"
    assert "literal-value" not in repr(secret) and "literal-value" not in str(secret)


def test_file_secret_strips_one_newline_and_reloads(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "key"
    path.write_text("first-value-1234\n")
    secret = FileSecret(path)
    assert secret.value == "first-value-1234"
    path.write_text("second-value-12345\r\n")
    assert secret.value == "second-value-12345"
    assert secret.version == 1


def test_file_secret_rewritten_in_place_with_a_value_of_the_same_length(tmp_path: Path, monkeypatch):
    """An editor or `kubectl cp` rewrites the file in place: same inode, same size, only the
    modification time tells the new key from the old one."""
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "key"
    path.write_text("key-value-aaaa-1234")
    secret = FileSecret(path)
    assert secret.value == "key-value-aaaa-1234"
    before = os.stat(path)
    with path.open("r+") as handle:  # in place: the inode stays
        handle.write("key-value-bbbb-1234")
    # A distinct modification time, whatever the file system's timestamp granularity.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert secret.value == "key-value-bbbb-1234"


class _Clock:
    """`gateway.secrets`' view of the `time` module, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


def test_file_secret_checks_at_most_once_a_second(tmp_path: Path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(secrets, "time", clock)
    path = tmp_path / "key"
    path.write_text("first-value-1234")
    secret = FileSecret(path)
    path.write_text("changed-value-1234")
    clock.now += secrets.CHECK_INTERVAL_S - 0.01
    assert secret.value == "first-value-1234"  # within the interval: not re-read yet
    clock.now += 0.01
    assert secret.value == "changed-value-1234"


def test_kubernetes_symlink_swap(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "key").write_text("version-one-key")
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/key", tmp_path / "key")
    secret = FileSecret(tmp_path / "key")
    assert secret.value == "version-one-key"
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "key").write_text("version-two-key")
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert secret.value == "version-two-key"


def test_unreadable_at_runtime_keeps_last_value(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "key"
    path.write_text("good-value-12345")
    secret = FileSecret(path)
    path.unlink()
    assert secret.value == "good-value-12345"
    assert secret.value == "good-value-12345"
    warnings = [r for r in caplog.records if "keeping the last value" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not on every request
    path.write_text("")
    assert secret.value == "good-value-12345"


def test_missing_or_empty_file_at_start_is_an_error(tmp_path: Path):
    with pytest.raises(SecretError, match="cannot read secret file"):
        FileSecret(tmp_path / "nope")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="is empty"):
        FileSecret(tmp_path / "empty")


def test_header_secrets_refuse_control_characters(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "key"
    path.write_text("abc\r\nX-Injected: 1\n")
    with pytest.raises(SecretError, match="line break"):
        FileSecret(path, header=True)
    assert FileSecret(path).value == "abc\r\nX-Injected: 1"  # a PEM-like multi-line secret is fine elsewhere
    path.write_text("good-key-123456\n")
    secret = FileSecret(path, header=True)
    path.write_text("evil-key\r\nX-Injected: 1\n")
    assert secret.value == "good-key-123456"  # a bad rotation keeps the last good value
    monkeypatch.setenv("GW_TEST_KEY", "a\x07b-1234567")
    with pytest.raises(SecretError):
        EnvSecret("GW_TEST_KEY", header=True)
    with pytest.raises(SecretError):
        LiteralSecret("x\ny-12345678", header=True)


def _spy_registrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the values handed to gateway.redaction.register (never the values)."""
    from gateway import redaction

    seen: list[int] = []
    real = redaction.register

    def spy(value: str) -> None:
        seen.append(len(value))
        real(value)

    monkeypatch.setattr(redaction, "register", spy)
    return seen


def test_an_oversized_env_or_literal_secret_is_refused_before_anything_touches_it(monkeypatch):
    """Key Vault's limit (25 KB) for every source: a 3 MiB value is refused, naming its source, and never
    reaches the redaction registry (which every later log line would scan)."""
    registered = _spy_registrations(monkeypatch)
    huge = "k" * (3 << 20)
    monkeypatch.setenv("GW_TEST_HUGE", huge)
    with pytest.raises(SecretError, match=r"environment variable GW_TEST_HUGE .*over the limit of 25600"):
        EnvSecret("GW_TEST_HUGE")
    with pytest.raises(SecretError, match=r"the literal secret .*over the limit of 25600"):
        LiteralSecret(huge)
    with pytest.raises(SecretError, match=r"endpoint key .*over the limit of 25600"):
        secrets.ManagedSecret("endpoint key primary").set(huge)
    at_limit = "v" * secrets.MAX_SECRET_CHARS
    monkeypatch.setenv("GW_TEST_HUGE", at_limit)
    assert EnvSecret("GW_TEST_HUGE").value == at_limit
    assert max(registered) == secrets.MAX_SECRET_CHARS


def test_an_oversized_secret_file_is_refused_at_start_and_a_rotation_to_one_keeps_the_last_value(
    tmp_path: Path, monkeypatch, caplog
):
    monkeypatch.setattr(secrets, "CHECK_INTERVAL_S", 0.0)
    registered = _spy_registrations(monkeypatch)
    path = tmp_path / "key"
    path.write_bytes(b"k" * (3 << 20))
    with pytest.raises(SecretError, match=rf"secret file {path} is 3145728 bytes, over the limit of 25600"):
        FileSecret(path)
    assert registered == []

    path.write_text("good-value-12345\n")
    secret = FileSecret(path)
    path.write_text("x" * (secrets.MAX_SECRET_CHARS + 1) + "\n")  # just over, as characters
    assert secret.value == "good-value-12345"
    path.write_bytes(b"y" * (3 << 20))
    assert secret.value == "good-value-12345"
    refusals = [r.getMessage() for r in caplog.records if "over the limit" in r.getMessage()]
    assert len(refusals) == 2 and all(str(path) in m and "keeping the last value" in m for m in refusals)
    assert max(registered) == len("good-value-12345")
    path.write_text("v" * secrets.MAX_SECRET_CHARS + "\n")  # at the limit: taken
    assert secret.value == "v" * secrets.MAX_SECRET_CHARS
