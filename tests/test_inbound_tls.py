"""Inbound transports of a real `gateway serve`: TLS termination with rotation, mutual TLS, Unix socket."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import resource
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PRIMARY
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from servers import free_socket

GATEWAY = [sys.executable, "-m", "gateway.cli"]


class Ca:
    """A throwaway CA that issues server and client certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _free_port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


def _replace(path: Path, data: bytes) -> None:
    """Write the way a secret volume or an operator's `mv` does: the new file appears whole."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _serve(tmp_path: Path, upstream_url: str, server: dict[str, Any]) -> subprocess.Popen[str]:
    config = {
        "server": server,
        "routes": {
            "open": {
                "path": "/open",
                "upstream": upstream_url,
                "auth": {"type": "key", "primary": {"env": "TLS_TEST_KEY"}},
            }
        },
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [*GATEWAY, "serve", "--config", str(path)],
        env={**os.environ, "TLS_TEST_KEY": PRIMARY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.terminate()
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr


def _request(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _wait_listening(connect: Any, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            with connect() as sock:
                if _request(sock, "/healthz").startswith(b"HTTP/1.1 200"):
                    return
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    raise AssertionError("gateway did not start")


def _tls_client(ca: Ca, tmp_path: Path, client_cert: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem().decode())
    if client_cert is not None:
        (tmp_path / "client.pem").write_bytes(client_cert[0])
        (tmp_path / "client-key.pem").write_bytes(client_cert[1])
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client-key.pem")
    return context


@pytest.fixture
def server_pki(tmp_path: Path) -> Iterator[tuple[Ca, Path, Path]]:
    ca = Ca("gateway test server CA")
    cert, key = ca.issue("localhost", server=True)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    yield ca, cert_file, key_file


def test_tls_termination_picks_up_a_rotated_certificate_without_restart(
    upstream: Any, server_pki: tuple[Ca, Path, Path], tmp_path: Path
) -> None:
    app, upstream_server = upstream
    ca, cert_file, key_file = server_pki
    port = _free_port()
    tls = {"cert": {"file": str(cert_file)}, "key": {"file": str(key_file)}}
    process = _serve(tmp_path, upstream_server.url, {"host": "127.0.0.1", "port": port, "tls": tls})
    client = _tls_client(ca, tmp_path)

    def connect() -> ssl.SSLSocket:
        return client.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )

    def served_certificate() -> str:
        with connect() as sock:
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest()

    try:
        _wait_listening(connect, process)
        with connect() as sock:
            answer = _request(sock, "/open/echo")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert app.requests[-1]["headers"].count(("x-forwarded-proto", "https")) == 1
        first = served_certificate()

        new_cert, new_key = ca.issue("localhost", server=True)
        _replace(key_file, new_key)
        _replace(cert_file, new_cert)
        expected = hashlib.sha256(
            x509.load_pem_x509_certificate(new_cert).public_bytes(serialization.Encoding.DER)
        ).hexdigest()
        deadline = time.monotonic() + 15
        while served_certificate() != expected:
            assert time.monotonic() < deadline, "the rotated certificate was not picked up"
            time.sleep(0.3)
        assert first != expected
        with connect() as sock:
            assert _request(sock, "/healthz").startswith(b"HTTP/1.1 200")
        assert process.poll() is None  # the same process: no restart
    finally:
        stderr = _stop(process)
    assert "BEGIN" not in stderr  # no PEM in the log


def test_mutual_tls_refuses_clients_without_a_certificate_and_protects_a_public_bind(
    upstream: Any, server_pki: tuple[Ca, Path, Path], tmp_path: Path
) -> None:
    _, upstream_server = upstream
    ca, cert_file, key_file = server_pki
    client_ca = Ca("gateway test client CA")
    (tmp_path / "client-ca.pem").write_bytes(client_ca.pem())
    port = _free_port()
    tls = {
        "cert": {"file": str(cert_file)},
        "key": {"file": str(key_file)},
        "client_ca": str(tmp_path / "client-ca.pem"),
    }
    # 0.0.0.0 without inbound.allow_cidrs or api_keys: mutual TLS is the inbound protection.
    # Two workers: each builds its own rotating TLS context from the same settings.
    process = _serve(
        tmp_path, upstream_server.url, {"host": "0.0.0.0", "port": port, "tls": tls, "workers": 2}
    )
    with_cert = _tls_client(ca, tmp_path, client_ca.issue("app-1", server=False))
    stranger = Ca("someone else's CA")
    (tmp_path / "foreign").mkdir()
    with_foreign_cert = _tls_client(ca, tmp_path / "foreign", stranger.issue("intruder", server=False))
    without_cert = _tls_client(ca, tmp_path)

    def connect(context: ssl.SSLContext) -> ssl.SSLSocket:
        return context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )

    try:
        _wait_listening(lambda: connect(with_cert), process)
        with connect(with_cert) as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
        for context in (without_cert, with_foreign_cert):
            # TLS 1.3 reports the refusal at the client's first read, TLS 1.2 during the handshake.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with connect(context) as sock:
                    answer = _request(sock, "/open/echo")
                    assert not answer, answer[:100]
                    raise ConnectionError("closed without an answer")
    finally:
        _stop(process)


def test_unix_socket_listener_beside_tcp_and_alone(upstream: Any, tmp_path: Path) -> None:
    _, upstream_server = upstream
    path = tmp_path / "gateway.sock"
    port = _free_port()

    def connect_unix() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        return sock

    process = _serve(tmp_path, upstream_server.url, {"host": "127.0.0.1", "port": port, "uds": str(path)})
    try:
        _wait_listening(connect_unix, process)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with connect_unix() as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
    finally:
        _stop(process)
    assert not path.exists()  # removed at exit

    process = _serve(tmp_path, upstream_server.url, {"uds": str(path), "tcp": False, "port": port})
    try:
        _wait_listening(connect_unix, process)
        with connect_unix() as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        _stop(process)


def _open_fds(process: subprocess.Popen[Any]) -> int:
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def _rss_mib(process: subprocess.Popen[Any]) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("limits", "bound"),
    [({"max_connections": 64}, 64), ({"tls": {"max_handshakes": 32}}, 32)],
    ids=["max_connections", "max_handshakes"],
)
def test_a_flood_of_idle_and_slow_handshakes_leaves_clients_served_and_descriptors_bounded(
    upstream: Any, server_pki: tuple[Ca, Path, Path], tmp_path: Path, limits: dict[str, Any], bound: int
) -> None:
    """A TLS connection counts from its TCP accept, not from the end of its handshake: 400 sockets that
    never finish a handshake held 415 descriptors for the whole handshake timeout, and with the
    descriptor limit at 256 legitimate clients were reset. Now the oldest unfinished handshake makes
    room for a new connection, and a connection over `server.max_connections` is closed at once."""
    _, upstream_server = upstream
    ca, cert_file, key_file = server_pki
    port = _free_port()
    tls = {"cert": {"file": str(cert_file)}, "key": {"file": str(key_file)}, **limits.get("tls", {})}
    server = {"host": "127.0.0.1", "port": port, "tls": tls, "log_level": "warning"}
    server.update({name: value for name, value in limits.items() if name != "tls"})
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "server": server,
                "routes": {
                    "open": {
                        "path": "/open",
                        "upstream": upstream_server.url,
                        "auth": {"type": "key", "primary": {"env": "TLS_TEST_KEY"}},
                    }
                },
            }
        )
    )

    def descriptor_limit() -> None:  # as the attacker's gateway ran: 256 descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*GATEWAY, "serve", "--config", str(config_path)],
            env={**os.environ, "TLS_TEST_KEY": PRIMARY},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=descriptor_limit,
        )
    client = _tls_client(ca, tmp_path)

    def connect() -> ssl.SSLSocket:
        return client.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
        )

    flood: list[socket.socket] = []
    try:
        _wait_listening(connect, process)
        baseline_fds = _open_fds(process)
        baseline_rss = _rss_mib(process)
        for number in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if number % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
            flood.append(sock)
        # While the flood holds its sockets, clients that finish their handshake are served...
        for _ in range(5):
            with connect() as sock:
                answer = _request(sock, "/open/echo")
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # ...and the gateway holds no more descriptors than its limit allows.
        assert _open_fds(process) <= baseline_fds + bound + 8, (_open_fds(process), baseline_fds)
        for sock in flood:
            sock.close()
        flood = []
        with connect() as sock:
            assert _request(sock, "/healthz").startswith(b"HTTP/1.1 200")
        # A generous bound (the issue measured +156 MiB for 3,000 pending handshakes).
        assert _rss_mib(process) - baseline_rss < 30, (baseline_rss, _rss_mib(process))
    finally:
        for sock in flood:
            sock.close()
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_a_session_resumed_after_its_client_ca_was_removed_is_refused(
    upstream: Any, server_pki: tuple[Ca, Path, Path], tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Removing a CA from `client_ca` refused fresh handshakes with its certificates, but a client that
    resumed its earlier session (a ticket, or a session id in TLS 1.2) still got 200."""
    _, upstream_server = upstream
    ca, cert_file, key_file = server_pki
    revoked, kept = Ca("client CA to be removed"), Ca("client CA that stays")
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(revoked.pem() + kept.pem())
    port = _free_port()
    tls = {"cert": {"file": str(cert_file)}, "key": {"file": str(key_file)}, "client_ca": str(client_ca)}
    process = _serve(tmp_path, upstream_server.url, {"host": "127.0.0.1", "port": port, "tls": tls})
    (tmp_path / "revoked").mkdir()
    (tmp_path / "kept").mkdir()
    client = _tls_client(ca, tmp_path / "revoked", revoked.issue("app-1", server=False))
    client.minimum_version = client.maximum_version = version
    other_client = _tls_client(ca, tmp_path / "kept", kept.issue("app-2", server=False))

    def connect(context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10),
            server_hostname="localhost",
            session=session,
        )

    def served(context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> bool:
        try:
            with connect(context, session) as sock:
                return _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
        except (ssl.SSLError, ConnectionError):
            return False

    try:
        _wait_listening(lambda: connect(other_client), process)
        with connect(client) as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
            session = sock.session  # TLS 1.3: the ticket came with the answer
        assert session is not None
        with connect(client, session) as sock:
            assert _request(sock, "/open/echo").startswith(b"HTTP/1.1 200")
            # With client_ca set no tickets are issued: TLS 1.2 resumes by session id, TLS 1.3 does not.
            assert sock.session_reused == (version == ssl.TLSVersion.TLSv1_2)
            session = sock.session

        _replace(client_ca, kept.pem())
        deadline = time.monotonic() + 15
        while served(client):  # a fresh handshake is refused once the change is picked up
            assert time.monotonic() < deadline, "the changed client_ca was not picked up"
            time.sleep(0.3)
        assert not served(client, session), "the session from before the change was resumed"
        assert served(other_client)
    finally:
        _stop(process)


def test_two_gateways_on_one_unix_socket_path(upstream: Any, tmp_path: Path) -> None:
    """The second silently unlinked the first's live socket (and took its clients), and the first's
    shutdown then deleted the second's. Now the second refuses to start; a stale socket file nobody
    listens on is replaced; a gateway removes at exit only the socket file it created."""
    _, upstream_server = upstream
    path = tmp_path / "gateway.sock"
    server = {"uds": str(path), "tcp": False, "port": _free_port()}
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()

    def connect_unix() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        return sock

    first = _serve(tmp_path / "first", upstream_server.url, server)
    try:
        _wait_listening(connect_unix, first)
        inode = os.stat(path).st_ino
        second = _serve(tmp_path / "second", upstream_server.url, server)
        try:
            assert second.wait(30) == 2
        finally:
            stderr = _stop(second)
        assert f"another process is listening on {path}" in stderr, stderr
        assert os.stat(path).st_ino == inode
        with connect_unix() as sock:
            assert _request(sock, "/healthz").startswith(b"HTTP/1.1 200")

        # Another process replaces the socket file (as a second instance started by hand would after
        # deleting it): the first gateway's shutdown must leave it alone.
        path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other.listen(1)
    finally:
        _stop(first)
    try:
        assert path.exists(), "the first gateway deleted a socket file it did not create"
        with connect_unix():
            pass  # still the other process's live socket
    finally:
        other.close()  # closed without unlinking: a stale socket file, as a killed process leaves it

    third = _serve(tmp_path / "third", upstream_server.url, server)
    try:
        _wait_listening(connect_unix, third)  # the stale file was replaced
    finally:
        _stop(third)
    assert not path.exists()  # its own socket file is removed at exit
