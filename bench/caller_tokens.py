"""Microseconds per Entra ID caller-token validation: cold (a token not seen before: header, RS256
signature, claims) and warm (the same token again: its SHA-256 found in the validated-token cache).

    python bench/caller_tokens.py [--tokens 2000] [--repeat 5]

Starts the emulator on loopback, reads its signing keys as the gateway does, then times
`CallerTokenValidator.validate` with `timeit` in CPU time of the calling thread (best of `--repeat`), so
other work on a busy machine does not count. Prints two lines; no network beyond
loopback. A few seconds of one core: run it on a quiet machine for numbers worth comparing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit

import httpx

from gateway.caller_tokens import CallerTokenValidator
from gateway.callers import CallerFactory
from gateway.config import parse_config
from gateway.emulator import EmulatorServer, EmulatorState
from gateway.signing_keys import EntraSigningKeys
from gateway.tls import client_context

TENANT = "be7c0000-0000-4000-8000-000000000001"
CLIENT = "be7c0000-0000-4000-8000-0000000000c1"
AUDIENCE = "api://scoring-gateway"


async def measure(server: EmulatorServer, tokens: int, repeat: int) -> tuple[float, float]:
    config = parse_config(
        {
            "inbound": {
                "entra_id": {"tenant_id": TENANT, "audiences": [AUDIENCE], "authority": server.https_url}
            },
            "routes": {
                "r": {
                    "path": "/r",
                    "upstream": server.http_url,
                    "auth": {"type": "none"},
                    "callers": {"app_ids": [CLIENT]},
                }
            },
        }
    )
    assert config.inbound.entra_id is not None
    issued = [
        server.state.issue_access_token(
            audience=AUDIENCE, tenant_id=TENANT, appid=CLIENT, roles=["Scoring.Invoke"]
        ).encode()
        for _ in range(tokens)
    ]
    async with httpx.AsyncClient(verify=client_context(str(server.ca_file)), trust_env=False) as http:
        keys = EntraSigningKeys(config.inbound.entra_id, lambda: http)
        await keys.start()
        callers = CallerFactory(config)
        cold = float("inf")
        for _ in range(repeat):
            validator = CallerTokenValidator(config.inbound.entra_id, keys, callers, cache_size=tokens)
            check, pending = validator.validate, iter(issued)
            timer = timeit.Timer(
                lambda check=check, pending=pending: check(next(pending)), timer=time.thread_time
            )
            seconds = timer.timeit(number=tokens)
            cold = min(cold, seconds / tokens)
        token = issued[0]
        validator.validate(token)
        warm_runs = 100_000
        warm = (
            min(timeit.repeat(lambda: validator.validate(token), number=warm_runs, repeat=repeat)) / warm_runs
        )
        await keys.aclose()
    return cold * 1e6, warm * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2000, help="distinct tokens for the cold case")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    args = parser.parse_args()
    with EmulatorServer(EmulatorState()) as server:
        cold, warm = asyncio.run(measure(server, args.tokens, args.repeat))
    print(f"cold (signature and claims): {cold:.1f} µs per validation")
    print(f"warm (validated-token cache hit): {warm:.2f} µs per validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
