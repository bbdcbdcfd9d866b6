"""A small mutation check: plant one plausible one-line bug at a time in a critical module and run the
tests that should catch it; report the mutants that survive (issue 20).

    python tests/mutants.py                 # every mutant, then the table
    python tests/mutants.py --list          # the mutants, whether each target is found; nothing run
    python tests/mutants.py -k budget -k cidr   # the mutants whose name contains one of these
    python tests/mutants.py --jobs 2        # two mutants at a time (each in a copy of its own)

Nothing in the checkout is modified: the tracked files (and new, not ignored ones) are copied to a
temporary directory, each mutant is written into the copy and undone in a `finally`, and pytest runs
there with PYTHONPATH pointing at the copy (so `gateway serve` subprocesses run the mutant too).
Each mutant runs only its own test selection with `-x`: the whole check takes minutes, not hours.

A mutant names its target by a snippet of source text that must occur exactly once in its file. The
code moves as branches merge: a snippet that is gone (or no longer unique) is reported as
"target not found" with the file and the snippet's first line, so the list is easy to update.

Results: `killed` (a test failed; the first one is shown), `SURVIVED` (every selected test passed: a
gap, write the test that kills it), `target not found`, `error` (pytest could not run the selection,
e.g. a renamed test). Exit status: 0 when every mutant was killed, 1 when one survived, 2 when one
could not be planted or run. `--baseline` first runs every selection on the unmutated copy, so a
test that fails anyway is not taken for a kill.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # the behaviour the bug breaks, in words
    path: str  # relative to the checkout
    edits: tuple[tuple[str, str], ...]  # (snippet found exactly once, its replacement), applied in order
    tests: tuple[str, ...]  # pytest selection: files or node ids


def one(name: str, breaks: str, path: str, find: str, replace: str, *tests: str) -> Mutant:
    return Mutant(name, breaks, path, ((find, replace),), tests)


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ the twelve of issue 20
    one(
        "header-replacement",
        "the client's Authorization reaches the upstream",
        "gateway/headers.py",
        '_REQUEST_OWNED = HOP_BY_HOP | {\n    b"authorization",\n',
        "_REQUEST_OWNED = HOP_BY_HOP | {\n",
        "tests/test_headers.py",
        "tests/test_proxy.py",
    ),
    one(
        "failover",
        "a rejected key is not replaced by the other key within the request",
        "gateway/credentials/key.py",
        "            if other.name not in tried and other.usable(now, self.recheck_after_s):\n"
        "                return replay(other.grant(), tried)",
        "            if False:\n                return replay(other.grant(), tried)",
        "tests/test_proxy.py::test_failover_to_secondary_and_stays",
    ),
    one(
        "replay-after-timeout",
        "a request that timed out after it was sent is replayed",
        "gateway/retry.py",
        "allowed = self.on_connection_errors if before_sending else self.on_timeouts",
        "allowed = self.on_connection_errors if before_sending else True",
        "tests/test_replay.py::test_timeout_on_a_post_is_not_replayed_by_default",
    ),
    one(
        "retry-budget",
        "replays are not limited by the route's retry budget",
        "gateway/retry.py",
        "            and self.budget.try_withdraw()\n",
        "",
        "tests/test_replay.py::test_an_outage_through_the_proxy_is_held_to_the_retry_budget",
    ),
    one(
        "retry-budget-deposit",
        "requests are not counted in the retry budget (only its floor is left)",
        "gateway/proxy.py",
        "        policy.budget.deposit()\n",
        "",
        "tests/test_replay.py::test_an_outage_through_the_proxy_is_held_to_the_retry_budget",
    ),
    one(
        "redaction",
        "registered secret values are not masked",
        "gateway/redaction.py",
        "        text = matcher.sub(text)",
        "        pass",
        "tests/test_secret_hygiene.py",
        "tests/test_redaction.py",
    ),
    one(
        "single-flight",
        "concurrent requests on a cold token each fetch one",
        "gateway/tokens.py",
        "        task = self._inflight\n        if task is None:\n            wait = self.retry_at",
        "        task = None\n        if task is None:\n            wait = self.retry_at",
        "tests/test_tokens.py::test_concurrent_cold_requests_share_one_token_request",
    ),
    one(
        "disconnect-cancellation",
        "a client that hangs up does not cancel its upstream request",
        "gateway/exchange.py",
        "        if task is not None and not task.done():\n            task.cancel()",
        "        if task is not None and not task.done():\n            pass",
        "tests/test_inbound_lifecycle.py::test_a_client_hanging_up_cancels_the_upstream_request_and_frees_its_slot",
    ),
    one(
        "traversal",
        "upper-case encoded dots (%2E, %252E) pass the path check",
        "gateway/paths.py",
        "            lowered = current.lower()",
        "            lowered = current",
        "tests/test_proxy.py::test_paths_that_leave_their_route_are_refused",
    ),
    # Dropping only `method == b"CONNECT"` is an equivalent mutant: llhttp flags CONNECT as an
    # upgrade, so `should_upgrade()` still refuses it. Without the check, uvicorn starts the request.
    one(
        "connect",
        "a CONNECT request is handed to the proxy",
        "gateway/server_protocol.py",
        'if method == b"CONNECT" or parser.should_upgrade():',
        "if False:",
        "tests/test_properties.py::test_hostile_raw_requests_are_refused_and_never_leave_the_route",
    ),
    Mutant(
        "rotation-order",
        "gateway rotate writes the new key to its source after the endpoint took it",
        "gateway/rotate.py",
        (
            (
                "            redaction.register(new_key)\n            await self._write(slot, new_key)\n",
                "            redaction.register(new_key)\n",
            ),
            (
                '        slot.state = "regenerated in the endpoint; the old key no longer works"\n',
                '        if new_key is not None and slot.source != "listKeys":\n'
                "            await self._write(slot, new_key)\n"
                '        slot.state = "regenerated in the endpoint; the old key no longer works"\n',
            ),
        ),
        (
            "tests/test_rotate.py::test_a_failed_first_key_vault_write_stops_at_the_write_step_before_any_key_changes",
            "tests/test_rotate.py::test_each_key_is_in_the_vault_before_the_endpoint_takes_it",
        ),
    ),
    one(
        "header-byte-limit",
        "server.max_header_bytes counts only the last header",
        "gateway/server_protocol.py",
        "header_bytes = self._header_bytes = self._header_bytes + len(name) + len(value) + 4",
        "header_bytes = self._header_bytes = len(name) + len(value) + 4",
        "tests/test_headers.py",
    ),
    one(
        "empty-keyvault-value",
        "an empty Key Vault version replaces the last good key",
        "gateway/keyvault/client.py",
        "        if not value:\n            raise KeyVaultError",
        "        if value is None:\n            raise KeyVaultError",
        "tests/test_keyvault.py::test_an_empty_version_keeps_the_last_good_key_and_never_refuses_the_primary",
    ),
    # ------------------------------------------------------------------ more critical behaviours
    one(
        "hop-by-hop-response",
        "hop-by-hop headers of the upstream's answer reach the client",
        "gateway/headers.py",
        "        if lowered in _RESPONSE_READ:  # hot path",
        '        if lowered in {b"content-length", b"x-request-id"}:  # hot path',
        "tests/test_headers.py",
    ),
    one(
        "streamed-body-limit",
        "a streamed (chunked) body may grow past max_body_bytes",
        "gateway/proxy.py",
        "        if size > limit:\n            raise _BodyLimit",
        "        if size > 2 * limit:\n            raise _BodyLimit",
        "tests/test_replay.py::test_interrupted_probe_is_cleared_and_traffic_returns_to_the_primary",
        "tests/test_proxy.py",
    ),
    one(
        "timeout-statuses",
        "504 and 408 are replayed without retry.on_timeouts",
        "gateway/retry.py",
        "self.statuses = frozenset(statuses) | (TIMEOUT_STATUSES if on_timeouts else frozenset())",
        "self.statuses = frozenset(statuses) | TIMEOUT_STATUSES",
        "tests/test_replay.py::test_504_and_408_are_not_replayed_by_default",
    ),
    one(
        "expired-token",
        "a token is served past its expiry",
        "gateway/tokens.py",
        "serve_until=expires_mono - serve_margin(lifetime),",
        "serve_until=expires_mono + serve_margin(lifetime),",
        "tests/test_tokens.py::test_expired_token_is_never_served",
    ),
    one(
        "retry-after-floor",
        "an identity provider's Retry-After is not waited out",
        "gateway/backoff.py",
        "            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))",
        "            pass",
        "tests/test_tokens.py::test_retry_after_is_honoured",
    ),
    one(
        "outlier-threshold",
        "an upstream is ejected one failure later than outlier.consecutive_failures",
        "gateway/upstreams.py",
        "if probing or upstream.consecutive_failures >= self.outlier_failures:",
        "if probing or upstream.consecutive_failures > self.outlier_failures:",
        "tests/test_routing.py::test_outlier_ejection_and_failover",
    ),
    one(
        "inbound-api-key",
        "any inbound API key is accepted",
        "gateway/inbound.py",
        "            if hmac.compare_digest(digest, expected):",
        "            if True:",
        "tests/test_proxy.py::test_inbound_api_key",
    ),
    one(
        "allow-cidrs",
        "a client outside inbound.allow_cidrs is let in",
        "gateway/inbound.py",
        "        return any(address in network for network in self._networks)",
        "        return True",
        "tests/test_proxy.py::test_inbound_cidr",
    ),
    one(
        "request-id-form",
        "a client's x-request-id Azure ML refuses becomes the request id",
        "gateway/headers.py",
        '_REQUEST_ID_FORM = re.compile(rb"[A-Za-z0-9_-]{1,40}")',
        '_REQUEST_ID_FORM = re.compile(rb"[^\\r\\n]{1,400}")',
        "tests/test_replay.py::test_client_request_id_from_an_x_request_id_azure_ml_accepts",
    ),
    one(
        "keyvault-refetch",
        "keys rotated in the vault are not read again when the upstream rejects every key",
        "gateway/credentials/key.py",
        "        if self._refetch is not None:\n            held =",
        "        if False:\n            held =",
        "tests/test_keyvault.py::test_every_key_rejected_reads_the_vault_at_once",
    ),
    one(
        "arm-401-new-token",
        "a management token ARM refuses is not replaced",
        "gateway/azure_rest.py",
        "            if answer.status == 401 and attempt == 1:",
        "            if False:",
        "tests/test_credentials_aml.py::test_arm_401_fetches_the_management_token_again_once",
    ),
    one(
        "trace",
        "TRACE is forwarded (an upstream would echo the gateway's credential)",
        "gateway/proxy.py",
        '    if exchange.method == "TRACE":',
        '    if exchange.method == "TRACE-NOT":',
        "tests/test_properties.py::test_hostile_raw_requests_are_refused_and_never_leave_the_route",
    ),
    one(
        "transfer-coding",
        "Transfer-Encoding: gzip, chunked is accepted (the body is forwarded still coded, as plain)",
        "gateway/server_protocol.py",
        'elif value.strip().lower() != b"chunked":  # transfer-encoding',
        "elif False:  # transfer-encoding",
        "tests/test_acceptance_inbound.py::test_a_transfer_coding_other_than_chunked_is_refused_not_dropped",
    ),
    one(
        "duplicate-host",
        "a request with two Host headers is forwarded",
        "gateway/server_protocol.py",
        "            if self._host_count > 1:",
        "            if self._host_count > 2:",
        "tests/test_acceptance_inbound.py::test_two_host_headers_are_refused",
    ),
    one(
        "refusal-pinned-on-previous-request",
        "a request refused as its head completes (Upgrade, CONNECT, pipeline limit) is taken for the last",
        "gateway/server_protocol.py",
        "        parser = self.parser\n        method = parser.get_method()\n",
        "        self._phase = _BODY\n        parser = self.parser\n        method = parser.get_method()\n",
        "tests/test_inbound_attacks.py::test_a_refused_upgrade_pipelined_behind_requests_leaves_their_answers_alone",
    ),
    one(
        "early-answer-resets",
        "an answer given from the head closes at once while the body still arrives: the client reads a reset",
        "gateway/server_protocol.py",
        "        if not exchange.more_body:\n            self.transport.close()\n",
        "        if True:\n            self.transport.close()\n",
        "tests/test_inbound_attacks.py::test_an_answer_given_before_the_body_reaches_a_client_still_uploading",
    ),
    one(
        "head-error-with-body",
        "the gateway's own error answer to HEAD carries its JSON body",
        "gateway/exchange.py",
        'self.start([head], b"" if self.method == "HEAD" else body)',
        "self.start([head], body)",
        "tests/test_inbound_attacks.py::test_the_gateways_own_answer_to_head_has_no_body",
    ),
    one(
        "host-form-unchecked",
        "a Host header that is no host[:port] is forwarded (as X-Forwarded-Host)",
        "gateway/server_protocol.py",
        "                    if _HOST_FORM.fullmatch(value) is None:",
        "                    if False:",
        "tests/test_inbound_attacks.py::test_a_request_without_a_valid_host_is_refused",
    ),
    one(
        "http10-expect-continue",
        "an HTTP/1.0 client that sends Expect: 100-continue gets a 100 Continue",
        "gateway/server_protocol.py",
        "                self.expect_100_continue = False\n",
        "                pass\n",
        "tests/test_inbound_attacks.py::test_an_http_1_0_request_with_expect_gets_no_100_continue",
    ),
    one(
        "http10-collection-unbounded",
        "answers collected for HTTP/1.0 clients hold memory without a bound across requests",
        "gateway/proxy.py",
        "        if self._http10_collected + len(chunk) > HTTP10_COLLECTED_BYTES:",
        "        if False:",
        "tests/test_acceptance_upstream.py::test_http10_answers_being_collected_hold_a_bounded_amount_of_memory_together",
    ),
    one(
        "deadline-passed-still-sent",
        "a request whose retry.deadline_s ran out before it was sent is sent anyway, with 1 ms to answer",
        "gateway/proxy.py",
        "                if left < MIN_ATTEMPT_S:",
        "                if False:",
        "tests/test_deadline.py::test_a_request_whose_deadline_passed_before_it_was_sent_is_not_sent",
    ),
    one(
        "deadline-mid-body-blamed",
        "what retry.deadline_s left an attempt running out mid-body counts against the upstream",
        "gateway/proxy.py",
        '_ATTEMPT_LIMIT_PHASES = frozenset({"total", "deadline"})',
        '_ATTEMPT_LIMIT_PHASES = frozenset({"total"})',
        "tests/test_deadline.py::test_the_attempts_limit_running_out_mid_body_is_not_the_upstreams_failure",
    ),
    one(
        "deadline-named-timeout-s",
        "an attempt that retry.deadline_s cut short is named timeout_s in its answer and log line",
        "gateway/client.py",
        '    return "total" if total_timer == TIMEOUT_S else "deadline"',
        '    return "total"',
        "tests/test_deadline.py::test_an_attempt_cut_short_by_the_deadline_names_it",
    ),
    one(
        "token-refresh-wait-unbounded",
        "a request whose token was refused waits for the whole forced refresh, past its deadline",
        "gateway/credentials/token.py",
        "            return await by_deadline(until, self.entry.reject(grant))",
        "            return await self.entry.reject(grant)",
        "tests/test_deadline.py::test_a_forced_token_refresh_after_a_401_is_waited_for_no_longer_than_the_deadline",
    ),
    one(
        "http10-released-before-read",
        "an answer collected for an HTTP/1.0 client stops counting before the client has read it",
        "gateway/proxy.py",
        '            await exchange.send(b"")\n',
        "            pass\n",
        "tests/test_acceptance_upstream.py::test_http10_answers_waiting_for_clients_that_do_not_read_count_against_the_bound",
    ),
    one(
        "broken-refusal-counted-as-answer",
        "a refusal whose body broke off while it was dropped counts as the upstream's success",
        "gateway/proxy.py",
        "                if broken is None:\n",
        "                if True:\n",
        "tests/test_deadline.py::test_a_refusal_whose_body_breaks_off_while_it_is_dropped_counts_against_the_upstream",
    ),
    one(
        "key-refetch-wait-unbounded",
        "a request whose every key was refused waits for the whole key read, past its deadline",
        "gateway/credentials/key.py",
        "            await by_deadline(until, self._refetch())",
        "            await self._refetch()",
        "tests/test_deadline.py::test_a_key_refetch_after_every_key_was_refused_is_waited_for_no_longer_than_the_deadline",
    ),
    one(
        "keyvault-header-check",
        "a polled Key Vault version that cannot go in a header replaces the last good value",
        "gateway/keyvault/vaults.py",
        "        if self.header:\n            check_header_value(fetched.value",
        "        if False:\n            check_header_value(fetched.value",
        "tests/test_keyvault.py::test_a_polled_version_that_cannot_go_in_a_header_keeps_the_last_good_key",
    ),
    one(
        "x-forwarded-for",
        "the client's X-Forwarded-For chain is dropped instead of extended",
        "gateway/proxy.py",
        'lines += (b"X-Forwarded-For: ", inbound.xff, b", ", client_ip, b"\\r\\n")',
        'lines += (b"X-Forwarded-For: ", client_ip, b"\\r\\n")',
        "tests/test_proxy.py::test_x_forwarded_for_from_the_client_is_extended_not_replaced",
    ),
    one(
        "file-secret-change",
        "a key file rewritten in place with a value of the same length is not noticed",
        "gateway/secrets.py",
        "        if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._signature:",
        "        if (stat.st_size, stat.st_ino) == self._signature[1:]:",
        "tests/test_secrets.py::test_file_secret_rewritten_in_place_with_a_value_of_the_same_length",
    ),
    # ------------------------------------------------------------------ callers (issue 16)
    one(
        "caller-audience",
        "an Entra ID token for another API is accepted as a caller",
        "gateway/caller_tokens.py",
        "        if not any(isinstance(a, str) and a.lower() in self._audiences for a in audiences):",
        "        if False:",
        "tests/test_caller_tokens.py",
    ),
    one(
        "route-access",
        "a caller the route does not name may use it",
        "gateway/callers.py",
        "        if self._rule is not None and not self._rule.allows(caller):",
        "        if False:",
        "tests/test_callers.py",
        "tests/test_acceptance_callers.py",
    ),
    one(
        "connection-token",
        "a connection that proved one token is let in with any other",
        "gateway/inbound.py",
        "if memo.token == token and memo.validator is tokens",
        "if memo.token is not None and memo.validator is tokens",
        "tests/test_acceptance_callers.py::test_a_connection_recognises_the_token_its_last_request_proved_and_nothing_else",
    ),
    one(
        "connection-task-left-waiting",
        "a closed connection's task keeps waiting for a request (a shutdown waits for it)",
        "gateway/server_protocol.py",
        "            waiting.set_result(None)\n",
        "            pass\n",
        "tests/test_proxy.py::test_a_keep_alive_connection_is_served_by_one_task_that_ends_with_it",
    ),
    one(
        "connection-task-handover-lost",
        "a request handed to a connection's task that then fails is never answered",
        "gateway/server_protocol.py",
        "            handed.task = self._start_worker(handed)\n",
        "            pass\n",
        "tests/test_proxy.py::test_a_request_handed_to_a_connection_task_that_then_fails_is_still_answered",
    ),
    one(
        "log-handler-no-flush",
        "a buffered log stream keeps the access lines in its buffer",
        "gateway/logs.py",
        "        if not self._flushes:\n            super().flush()\n",
        "",
        "tests/test_logs.py",
    ),
    one(
        "log-batch-other-thread-first",
        "a line from another thread overtakes the loop thread's batched lines",
        "gateway/logs.py",
        "            if batch:\n                self._write_out()\n        self._write(line)\n",
        "        self._write(line)\n",
        "tests/test_logs.py",
    ),
    one(
        "log-batch-never-due",
        "batched log lines wait for a write that the loop never runs",
        "gateway/logs.py",
        "                    loop.call_soon(self._write_batch)\n",
        "                    pass\n",
        "tests/test_logs.py",
    ),
    one(
        "access-record-extras",
        "the access record loses its structured fields (JSON lines, caplog)",
        "gateway/telemetry.py",
        "access_logger.info(ACCESS_FORMAT, *args, extra=_access_extra(record, route, duration))",
        "access_logger.info(ACCESS_FORMAT, *args)",
        "tests/test_logs.py",
    ),
    one(
        "access-line-unredacted",
        "the access line written without a record skips redaction",
        "gateway/logs.py",
        "        message = redact(message)  # first: an error report below shows the message too\n",
        "",
        "tests/test_logs.py",
    ),
    one(
        "access-line-json-extras-unredacted",
        "the JSON access line written without a record shows a secret a client put in a field",
        "gateway/logs.py",
        '        return redact(f"{text}, {_encode_extras(extra)[1:]}" if extra else f"{text}}}")\n',
        '        return f"{text}, {_encode_extras(extra)[1:]}" if extra else f"{text}}}"\n',
        "tests/test_logs.py",
    ),
    one(
        "json-line-extra-named-like-a-field",
        "a JSON line whose extra has a field's name (`time`) shows both, not the extra in its place",
        "gateway/logs.py",
        "        if extra and not _JSON_LINE_FIELDS.isdisjoint(extra):\n",
        "        if False:\n",
        "tests/test_logs.py",
    ),
    one(
        "log-batch-stuck-after-stop",
        "lines logged once the loop stopped wait for a write it queued but will never run",
        "gateway/logs.py",
        "                if not loop.is_running():",
        "                if not loop.is_running() and not self._batch_due:",
        "tests/test_logs.py",
    ),
    one(
        "access-line-past-other-handlers",
        "the access line skips the library while another handler on the way would see its record",
        "gateway/logs.py",
        "        if current.handlers or not current.propagate:\n            return None\n",
        "",
        "tests/test_logs.py",
    ),
    one(
        "unread-answers-buffered",
        "a client that reads no answer has request after request forwarded and its answers buffered",
        "gateway/server_protocol.py",
        "        if self.flow.write_paused:\n            # The client has not read",
        "        if False:\n            # The client has not read",
        "tests/test_inbound_lifecycle.py::test_a_client_that_reads_no_answer_gets_no_more_of_its_requests_forwarded",
    ),
    one(
        "shutdown-cut-unrecorded",
        "a request cut off when the grace period ends is logged as status 0 without an error code",
        "gateway/proxy.py",
        "                record.error = SHUTTING_DOWN\n",
        "",
        "tests/test_cli.py::test_requests_cut_off_when_the_grace_period_ends_say_so_in_the_access_log",
    ),
    one(
        "refused-body-logged-as-gone",
        "a body refused while its request is served is logged as a client gone, under another request id",
        "gateway/server_protocol.py",
        "                offending.refused(error.code, error.status if answer_now else None)",
        "                offending.client_gone(DISCONNECTED)",
        "tests/test_inbound_attacks.py::test_a_body_refused_while_its_request_is_served_is_logged_as_the_answer_the_client_got",
    ),
    one(
        "refusal-read-whole",
        "a replayed refusal's body is read to its end, however large (unbounded memory and waiting)",
        "gateway/proxy.py",
        "            while dropped <= DISCARD_BYTES:",
        "            while True:",
        "tests/test_replay.py::test_a_refusal_with_a_large_body_is_not_read_whole_before_the_replay",
    ),
    Mutant(
        "invalid-status",
        "an upstream status below 100 is taken for an interim answer, one over 599 is passed on",
        "gateway/client.py",
        (
            (
                "            if status < 100:\n                self._invalid_status(status)",
                "            pass",
            ),
            ("        if status > 599:\n", "        if status > 999:\n"),
        ),
        ("tests/test_client_conformance.py::test_a_status_outside_100_to_599_is_a_protocol_error",),
    ),
    one(
        "bytes-in-streamed",
        "the access line's bytes_in leaves out a streamed body's bytes past the replay buffer",
        "gateway/proxy.py",
        "        size = record.bytes_in = record.bytes_in + len(chunk)",
        "        size = record.bytes_in + len(chunk)",
        "tests/test_proxy.py::test_bytes_in_counts_a_streamed_request_body",
    ),
    one(
        "bytes-out-client-gone",
        "the access line of a client that left mid-answer says bytes_out=0",
        "gateway/proxy.py",
        "        finally:\n            record.bytes_out = sent",
        "        else:\n            record.bytes_out = sent",
        "tests/test_inbound_lifecycle.py::test_a_client_leaving_mid_answer_is_logged_with_the_body_bytes_it_was_sent",
    ),
    one(
        "probe-wait-unbounded",
        "a request waits for the gateway's key probe past its own deadline (up to PROBE_TIMEOUT_S)",
        "gateway/credentials/key.py",
        "        await by_deadline(until, asyncio.shield(slot.probing))",
        "        await asyncio.shield(slot.probing)",
        "tests/test_verdicts.py::test_a_probe_that_never_answers_holds_the_request_no_longer_than_its_deadline",
    ),
    one(
        "retry-after-date",
        "a Retry-After given as an HTTP date is passed to the client instead of being waited for",
        "gateway/retry.py",
        "            until = seconds_until(value)\n",
        "            until = None\n",
        "tests/test_replay.py::test_retry_after_as_an_http_date_is_honoured_through_the_gateway",
    ),
    # ------------------------------------------------------------------ the attack pass (issue 19)
    one(
        "operation-origin",
        "rotate follows an operation URL to another host with the management token",
        "gateway/azure_rest.py",
        '        if urlsplit(url).scheme != "https" or origin_of(url) != allowed:',
        "        if False:",
        "tests/test_rotate.py::test_an_operation_url_off_the_arm_host_is_not_followed",
    ),
    one(
        "pool-shared-by-routes",
        "routes reaching one origin share one pool: a route's max_connections is not its own",
        "gateway/assembly.py",
        '        key = (route, f"{parts.scheme}://{parts.netloc}", max_connections)',
        '        key = ("", f"{parts.scheme}://{parts.netloc}", max_connections)',
        "tests/test_acceptance_upstream.py::test_routes_sharing_an_origin_each_keep_their_own_max_connections",
    ),
    one(
        "pool-not-retired",
        "a reload leaves the connections of a replaced pool open beside the new one",
        "gateway/app.py",
        "            self.assembly.retire_pools(old, router)",
        "            pass",
        "tests/test_acceptance_upstream.py"
        "::test_a_reload_lowering_max_connections_takes_effect_and_closes_the_old_connections",
    ),
    Mutant(
        "pool-kept-across-a-limit-change",
        "a reload that lowers max_connections keeps the running pool and its old limit",
        "gateway/assembly.py",
        (
            (
                "pools[old.name, upstream.origin, upstream.pool.max_connections] = upstream.pool",
                "pools[old.name, upstream.origin, 0] = upstream.pool",
            ),
            (
                '        key = (route, f"{parts.scheme}://{parts.netloc}", max_connections)',
                '        key = (route, f"{parts.scheme}://{parts.netloc}", 0)',
            ),
        ),
        (
            "tests/test_acceptance_upstream.py"
            "::test_a_reload_lowering_max_connections_takes_effect_and_closes_the_old_connections",
        ),
    ),
    one(
        "midbody-not-counted",
        "an upstream whose streamed answers break off mid-body is never ejected",
        "gateway/proxy.py",
        "            _broke_off(route, record.upstream, record, exc)\n"
        "            raise _aborted(exchange, record, sent, exc)",
        "            raise _aborted(exchange, record, sent, exc)",
        "tests/test_acceptance_upstream.py::test_an_upstream_whose_answers_break_off_mid_body_is_ejected",
    ),
    one(
        "success-at-the-head",
        "an answer's head counts as the upstream's success before its body arrived: one that then breaks "
        "off resets the count, and the upstream is never ejected",
        "gateway/upstreams.py",
        "            self.failed(upstream, owner)\n\n    def completed",
        "            self.failed(upstream, owner)\n        else:\n            self.succeeded(upstream)\n\n"
        "    def completed",
        "tests/test_acceptance_upstream.py::test_an_upstream_whose_answers_break_off_mid_body_is_ejected",
    ),
)


# ---------------------------------------------------------------------------------------- running
@dataclass
class Result:
    mutant: Mutant
    outcome: str  # killed, SURVIVED, target not found, error
    detail: str
    seconds: float


def copy_checkout(destination: Path) -> None:
    """The tracked files and new, not ignored ones: what a clean CI checkout of this tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        relative = Path(os.fsdecode(raw))
        source = ROOT / relative
        if not source.is_file():
            continue  # deleted in the work tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutants: `import gateway` in the copy loads {where}, not the copy; cannot mutate")


def plant(text: str, mutant: Mutant) -> tuple[str | None, str]:
    """The mutated text, or None and why not."""
    for find, replace in mutant.edits:
        count = text.count(find)
        if count != 1:
            first = find.strip().splitlines()[0]
            why = "not found" if count == 0 else f"found {count} times"
            return None, f"{mutant.path}: snippet {why}: {first!r}"
        text = text.replace(find, replace)
    return text, ""


def first_failure(output: str) -> str:
    for line in output.splitlines():
        # pytest's short summary (`-ra`): "FAILED tests/x.py::name - why"; not a captured log line.
        if line.startswith(("FAILED tests/", "ERROR tests/")):
            return line.split(" - ")[0]
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1] if tail else "(no output)"


def run_tests(copy: Path, tests: Sequence[str], timeout_s: float) -> tuple[int | None, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command,
            cwd=copy,
            env=environment(copy),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s"
    return done.returncode, done.stdout + done.stderr


def run_mutant(copy: Path, mutant: Mutant, timeout_s: float) -> Result:
    started = time.monotonic()
    path = copy / mutant.path
    if not path.is_file():
        return Result(mutant, "target not found", f"{mutant.path}: no such file", 0.0)
    original = path.read_text(encoding="utf-8")
    mutated, why = plant(original, mutant)
    if mutated is None:
        return Result(mutant, "target not found", why, 0.0)
    try:
        path.write_text(mutated, encoding="utf-8")
        code, output = run_tests(copy, mutant.tests, timeout_s)
    finally:
        path.write_text(original, encoding="utf-8")
    seconds = time.monotonic() - started
    if code is None:
        return Result(mutant, "killed", output, seconds)  # a hang is a failure the suite notices
    if code == 0:
        return Result(mutant, "SURVIVED", f"{len(mutant.tests)} selection(s) passed", seconds)
    if code == 1:
        return Result(mutant, "killed", first_failure(output), seconds)
    return Result(mutant, "error", f"pytest exit {code}: {first_failure(output)}", seconds)


def baseline(copy: Path, mutants: Sequence[Mutant], timeout_s: float) -> None:
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    print(f"baseline: {len(tests)} selections on the unmutated copy ...", flush=True)
    code, output = run_tests(copy, tests, timeout_s * 3)
    if code != 0:
        raise SystemExit(f"mutants: the selections fail without any mutant: {first_failure(output or '')}")


def table(results: Sequence[Result]) -> str:
    rows = [("mutant", "breaks", "result", "s", "detail")]
    for r in results:
        rows.append((r.mutant.name, r.mutant.breaks, r.outcome, f"{r.seconds:.0f}", r.detail))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(line.replace("\n", " ") for line in lines)


def chosen(patterns: Sequence[str]) -> list[Mutant]:
    if not patterns:
        return list(MUTANTS)
    return [m for m in MUTANTS if any(p in m.name for p in patterns)]


def workspaces(count: int) -> Iterator[Path]:
    for _ in range(count):
        copy = Path(tempfile.mkdtemp(prefix="gateway-mutants-"))
        copy_checkout(copy)
        check_imports_from(copy)
        yield copy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="patterns", action="append", default=[], help="mutant name contains")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (a copy each)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per mutant")
    parser.add_argument("--baseline", action="store_true", help="first run the selections unmutated")
    parser.add_argument("--keep", action="store_true", help="keep the copies (their paths are printed)")
    args = parser.parse_args(argv)
    mutants = chosen(args.patterns)
    if not mutants:
        print("no mutant matches", file=sys.stderr)
        return 2
    if args.list:
        missing = 0
        for m in mutants:
            path = ROOT / m.path
            _, why = plant(path.read_text(encoding="utf-8"), m) if path.is_file() else (None, "no such file")
            missing += bool(why)
            print(
                f"{m.name}: {m.breaks}\n  {m.path}: {'target not found: ' + why if why else 'target found'}"
            )
            print(f"  tests: {' '.join(m.tests)}")
        return 2 if missing else 0
    copies = list(workspaces(max(1, min(args.jobs, len(mutants)))))
    try:
        if args.baseline:
            baseline(copies[0], mutants, args.timeout)
        free = list(copies)
        results: list[Result] = []

        def job(mutant: Mutant) -> Result:
            copy = free.pop()
            try:
                result = run_mutant(copy, mutant, args.timeout)
            finally:
                free.append(copy)
            print(
                f"{result.outcome:>16}  {mutant.name}  ({result.seconds:.0f} s)  {result.detail}", flush=True
            )
            return result

        with ThreadPoolExecutor(len(copies)) as pool:
            results = list(pool.map(job, mutants))
    finally:
        for copy in copies:
            if args.keep:
                print(f"copy kept: {copy}")
            else:
                shutil.rmtree(copy, ignore_errors=True)
    print()
    print(table(results))
    outcomes = [r.outcome for r in results]
    print(
        f"\n{outcomes.count('killed')} killed, {outcomes.count('SURVIVED')} survived, "
        f"{outcomes.count('target not found')} not found, {outcomes.count('error')} errors "
        f"of {len(results)} mutants"
    )
    if "target not found" in outcomes or "error" in outcomes:
        return 2
    return 1 if "SURVIVED" in outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
