from __future__ import annotations

import io
import logging

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
