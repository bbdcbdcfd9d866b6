from __future__ import annotations

import io
import logging

from conftest import HYGIENE

from gateway import logs, redaction


def test_registered_values_and_token_shapes_are_masked():
    redaction.register("registered-secret-value")
    text = (
        "key registered-secret-value, Authorization: Bearer abc.def-ghi, "
        "jwt eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJl, client_secret=s3cr3t&x=1"
    )
    cleaned = redaction.redact(text)
    for secret in ("registered-secret-value", "abc.def-ghi", "eyJhbGciOiJSUzI1NiJ9", "s3cr3t"):
        assert secret not in cleaned
    assert "Bearer ***" in cleaned


def test_log_lines_are_redacted_text_and_json():
    # Known to the session's secret scan whatever `register` does: the scan reads every record as the
    # gateway's pipeline writes it (tests/conftest.py), so a redaction bug fails it as well.
    HYGIENE.add_secret("another-secret-value-42", "tests/test_redaction.py")
    redaction.register("another-secret-value-42")
    for fmt in ("text", "json"):
        stream = io.StringIO()
        logs.configure("info", fmt, stream=stream)
        logging.getLogger("gateway.test").warning("using %s", "another-secret-value-42")
        try:
            raise ValueError("boom another-secret-value-42")
        except ValueError:
            logging.getLogger("gateway.test").exception("failed")
        output = stream.getvalue()
        assert "another-secret-value-42" not in output
        assert "using ***" in output
    logs.configure("warning")


def test_registering_is_linear_in_the_values_not_quadratic(monkeypatch):
    """Twenty Key Vault-sized values (25 KB), each followed by a log line: the matcher is rebuilt once per
    change from the values' first characters, not recompiled from every value's full text (which was
    5 MB of pattern for these twenty, and stalled the event loop for seconds)."""
    import re
    import secrets

    compiled: list[int] = []
    real_compile = re.compile

    def counting_compile(pattern, flags=0):  # type: ignore[no-untyped-def]
        compiled.append(len(pattern))
        return real_compile(pattern, flags)

    monkeypatch.setattr(re, "compile", counting_compile)
    values = [secrets.token_urlsafe(25 * 1024)[: 25 * 1024] for _ in range(20)]
    for value in values:
        redaction.register(value)
        assert redaction.redact(f"line with {value} in it") == "line with *** in it"
    assert len(compiled) <= 20
    assert sum(compiled) < 20 * 64 * len(values), f"{sum(compiled)} characters of pattern compiled"


def _reference(values: list[str], text: str) -> str:
    """The masking rule as one regular expression of all the values, longest first (the old matcher)."""
    import re

    pattern = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
    return pattern.sub(redaction.MASK, text)


def test_overlapping_values_mask_like_one_alternation_longest_first():
    values = ["abcdefgh", "abcdefgh-longer-one", "xabcdefghy", "zzzzzzzzzz", "zzzzzzzzzz-zz"]
    text = "1 abcdefgh-longer-one 2 abcdefgh 3 xabcdefghy 4 zzzzzzzzzzzzzz-zz 5 abcdefg 6 abcdefgh-longer"
    assert redaction._Matcher(values).sub(text) == _reference(values, text)
    assert redaction._Matcher(values).sub(text).startswith("1 *** 2 *** 3 *** 4 ")


def test_the_matcher_masks_exactly_what_one_alternation_of_the_values_masks():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from("ab-_xyz")
    value = st.text(alphabet, min_size=8, max_size=14)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(value, min_size=1, max_size=6, unique=True),
        st.lists(st.one_of(value, st.text(alphabet, max_size=6))),
    )
    def check(values: list[str], parts: list[str]) -> None:
        text = "".join(parts)
        assert redaction._Matcher(values).sub(text) == _reference(values, text)

    check()


def test_the_shape_scan_is_skipped_only_where_it_could_not_match():
    """`redact` skips the case-insensitive shape scan on lines without any of its words; on every line the
    scan could change, it still runs, whatever the letter case or Unicode case variants `re` folds."""
    words = [
        "Bearer ",
        "bEaReR\t",
        "eyJ",
        "EYJ",
        "client_secret=",
        "CLIENT_ASSERTION:",
        "access_token=",
        "AccessToken: ",
        "primaryKey=",
        "secondaryKey='",
        "pr\u0131maryKey=",
        "primaryKEY=",
        "primary\u212aey=",
        "client_\u017fecret=",
    ]  # dotless i, the Kelvin sign, the long s
    tails = ["abcdefghij.klmnopqrst.uvw", "s3cr3t-value", ""]
    lines = [f"x {word}{tail} y" for word in words for tail in tails]
    lines += ["GET /iris/score 200 route=iris caller=key:batch", "nothing here", "\u0131", ""]
    for line in lines:
        assert redaction.redact(line) == redaction._SHAPES.sub(redaction._mask_shape, line), line
    assert redaction.redact("x bearer abc y") == "x bearer *** y"
    assert "s3cr3t" not in redaction.redact("pr\u0131maryKey=s3cr3t")  # `re` folds U+0131 to i


def test_the_text_line_is_redacted_by_the_filter_once():
    """The text formatter relies on the handler's filter (installed with it by `configure`); the line
    it writes carries no secret and no second line."""
    redaction.register("yet-another-secret-value-7")
    HYGIENE.add_secret("yet-another-secret-value-7", "tests/test_redaction.py")
    stream = io.StringIO()
    logs.configure("info", "text", stream=stream)
    logging.getLogger("gateway.test").warning("a %s\nforged line", "yet-another-secret-value-7")
    output = stream.getvalue()
    logs.configure("warning")
    assert "yet-another-secret-value-7" not in output and "a ***\\nforged line" in output
    assert output.count("\n") == 1
