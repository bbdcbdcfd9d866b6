"""The `gateway` command: serve, check, rotate, emulator, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.config import GatewayConfig, default_config_path, is_loopback, load_config
from gateway.errors import ConfigError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_CONFIG = 2

logger = logging.getLogger("gateway.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description=(
            "scoring-gateway: lets applications call Azure Machine Learning scoring endpoints without "
            "handling Azure credentials. Apps send plain HTTP; the gateway attaches the route's key or "
            "token and forwards the request."
        ),
    )
    parser.add_argument("--version", action="version", version=f"scoring-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_help = "configuration file (default: $GATEWAY_CONFIG, then config/gateway.yaml)"
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGTERM or Ctrl-C; in-flight requests get server.grace_period_s "
        "to finish. SIGHUP (or a change to the config file) reloads the configuration.",
    )
    serve.add_argument("--config", metavar="PATH", help=config_help)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides server.log_level"
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides server.log_format")

    check = commands.add_parser(
        "check",
        help="validate the config, resolve secrets, acquire credentials, reach upstreams",
        description="Validates the configuration, resolves every secret (never printing a value), acquires "
        "every credential once and opens a connection to every upstream. Prints one line per route. "
        "Exit status: 0 all well, 1 something is not, 2 invalid configuration.",
    )
    check.add_argument("--config", metavar="PATH", help=config_help)

    emulator = commands.add_parser(
        "emulator",
        help="run the local Azure ML endpoint + Entra ID stand-in",
        description="Runs a local stand-in for an Azure ML online endpoint (scoring with key, AML token or "
        "Entra token auth), Microsoft Entra ID and the Azure ML control plane, to develop apps offline.",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=5001, help="plain HTTP port (default 5001)")
    emulator.add_argument("--tls-port", type=int, default=None, help="HTTPS port (default: any free port)")

    rotate = commands.add_parser(
        "rotate",
        help="rotate both keys of a key route's Azure ML endpoint without failed requests",
        description="Regenerates the endpoint's keys slot by slot, the one not in use first: writes each new "
        "key to Key Vault (or the key file) before ARM regenerateKeys makes it valid, verifies it against "
        "the endpoint, and waits for every gateway to pick it up before the other slot. Never prints a key. "
        "Exit status: 0 rotated, 1 a step failed (the message names it and the state of both keys), "
        "2 invalid configuration. See docs/rotation.md.",
    )
    rotate.add_argument("route", metavar="ROUTE", help="the key route whose endpoint keys to rotate")
    rotate.add_argument("--config", metavar="PATH", help=config_help)
    rotate.add_argument(
        "--slots",
        default="secondary,primary",
        help="slots in the order to rotate them (default: secondary,primary; the primary is in use)",
    )
    rotate.add_argument(
        "--settle-s",
        type=float,
        default=None,
        metavar="N",
        help="wait between slots (default: the longest refresh interval of the route's key sources + margin)",
    )
    rotate.add_argument(
        "--verify-url",
        default=None,
        metavar="URL",
        help="URL to verify each new key with a GET (default: swagger.json beside the scoring URI)",
    )
    rotate.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")

    demo = commands.add_parser(
        "demo",
        help="end-to-end demo on this machine: emulator + gateway + the seed's client code",
        description="Starts the emulator and the gateway on free loopback ports, scores two rows through the "
        "gateway with plain HTTP and no credentials, regenerates the primary key and shows failover, then "
        "rotates both keys with `gateway rotate` while requests flow and counts the failed ones (zero).",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="leave both running and print a curl command"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.command == "serve":
        return serve(args)
    if args.command == "check":
        return check(args)
    if args.command == "emulator":
        from gateway.emulator.server import run_cli

        return run_cli(args.host, args.port, args.tls_port)
    if args.command == "rotate":
        return rotate(args)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(keep_running=args.keep_running)
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


def _load(path: str | None) -> tuple[str, GatewayConfig]:
    config_path = path or default_config_path()
    return config_path, load_config(config_path)


def _with_overrides(config: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    server: dict[str, Any] = {}
    for name in ("host", "port", "workers", "log_level", "log_format"):
        value = getattr(args, name, None)
        if value is not None:
            server[name] = value
    if not server:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=server)})


def inbound_problem(config: GatewayConfig) -> str | None:
    server = config.server
    if is_loopback(server.host) or server.allow_unauthenticated_remote:
        return None
    if config.inbound.enabled:
        return None
    return (
        f"server.host is {server.host}, which is reachable from other machines, and no inbound protection "
        "is configured: anyone who can reach it could use this gateway's credentials. Configure "
        "`inbound.allow_cidrs` and/or `inbound.api_keys`, bind 127.0.0.1, or set "
        "`server.allow_unauthenticated_remote: true` if the network already restricts access"
    )


def serve(args: argparse.Namespace) -> int:
    from gateway import logs

    try:
        config_path, config = _load(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = _with_overrides(config, args)
    server = config.server
    logs.configure(server.log_level, server.log_format)
    problem = inbound_problem(config)
    if problem:
        print(f"gateway: refusing to start: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    import uvicorn

    from gateway.app import GatewayApp, GatewayHttpToolsProtocol

    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "loop": "uvloop",
        "http": GatewayHttpToolsProtocol,  # httptools, plus refusing absolute-form request targets
        "lifespan": "on",
        "server_header": False,  # the upstream's Server and Date headers pass through
        "date_header": False,
        "access_log": False,
        "log_config": None,
        "timeout_keep_alive": server.keepalive_timeout_s,
        "timeout_graceful_shutdown": server.grace_period_s,
        "proxy_headers": False,
        "limit_concurrency": server.max_connections,
    }
    # uvicorn re-raises the stop signal once it has drained; with these no-op handlers in place that
    # re-raise ends `run()` normally, so a clean SIGTERM or Ctrl-C exits with status 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda signum, frame: None)
    if server.workers == 1:
        try:
            app = GatewayApp(config, config_path=config_path)
        except ConfigError as exc:
            print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
            return EXIT_CONFIG
        uv_server = uvicorn.Server(uvicorn.Config(app, **options))
        uv_server.run()
        return EXIT_OK if uv_server.started else EXIT_PROBLEM

    # Several workers: validate here so a bad config fails fast, then let each worker build its own app.
    try:
        GatewayApp(config, config_path=config_path)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    os.environ["GATEWAY_CONFIG"] = os.path.abspath(config_path)
    os.environ["GATEWAY_LOG_LEVEL"] = server.log_level
    os.environ["GATEWAY_LOG_FORMAT"] = server.log_format
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="gateway-metrics-"))
    uvicorn.run("gateway.app:app_from_env", factory=True, workers=server.workers, **options)
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    from gateway import logs

    logs.configure("error")
    try:
        config_path, config = _load(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.check import run_check

    return asyncio.run(run_check(config, config_path))


def rotate(args: argparse.Namespace) -> int:
    from gateway import logs

    logs.configure("warning")
    try:
        config_path, config = _load(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.settle_s is not None and args.settle_s < 0:
        print("gateway rotate: --settle-s must not be negative", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.rotate import run_rotate

    slots = [s.strip().lower() for s in args.slots.split(",") if s.strip()]
    return asyncio.run(
        run_rotate(
            config,
            config_path,
            args.route,
            slots=slots,
            settle_s=args.settle_s,
            dry_run=args.dry_run,
            verify_url=args.verify_url,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
