"""The `gateway` command: serve, check, rotate, emulator, demo."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uvicorn import config as uvicorn_config

from gateway import __version__
from gateway.config import (
    GatewayConfig,
    ServerConfig,
    default_config_path,
    load_config,
    with_server_overrides,
)
from gateway.errors import ConfigError
from gateway.inbound import inbound_problem
from gateway.tls_listener import TlsListenerLoop

if TYPE_CHECKING:
    from gateway.app import GatewayApp

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
        "2 invalid configuration, 3 another rotation of the endpoint is running (nothing changed). "
        "See docs/rotation.md.",
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


def _server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    for name in ("host", "port", "workers", "log_level", "log_format"):
        value = getattr(args, name, None)
        if value is not None:
            server[name] = value
    return server


def serve(args: argparse.Namespace) -> int:
    from gateway import logs

    try:
        config_path, config = _load(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = with_server_overrides(config, _server_overrides(args))
    server = config.server
    logs.configure(server.log_level, server.log_format)
    problem = inbound_problem(config)
    if problem:
        print(f"gateway: refusing to start: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from gateway.app import GatewayApp
    from gateway.server_protocol import InboundLimits, http_protocol

    options: dict[str, Any] = {
        "loop": "uvloop",
        # httptools, with limits enforced while bytes arrive, the request head timed, desync refused
        "http": http_protocol(InboundLimits.from_config(server)),
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
    try:
        # A reloaded file gets the same command-line overrides: they describe the running listener.
        app = GatewayApp(config, config_path=config_path, server_overrides=_server_overrides(args))
        if server.tls is not None:
            app.server_tls()  # a certificate that does not load fails here, not per worker
        listeners = listen_sockets(server)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if server.workers == 1:
            uv_server = uvicorn.Server(GatewayUvicornConfig(app, server=server, **options))
            uv_server.run(sockets=listeners.sockets)
            return EXIT_OK if uv_server.started else EXIT_PROBLEM
        # Several workers: the config is valid (above); each worker builds its own app from it.
        os.environ["GATEWAY_CONFIG"] = os.path.abspath(config_path)
        os.environ["GATEWAY_LOG_LEVEL"] = server.log_level
        os.environ["GATEWAY_LOG_FORMAT"] = server.log_format
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="gateway-metrics-"))
        uv_config = GatewayUvicornConfig(
            "gateway.app:app_from_env",
            factory=True,
            workers=server.workers,
            server=server,
            **options,
        )
        Multiprocess(uv_config, sockets=listeners.sockets).run()
        return EXIT_OK
    finally:
        listeners.close()


class GatewayUvicornConfig(uvicorn_config.Config):
    """uvicorn's Config with the gateway's server TLS: an SSLContext that picks up a rotated
    certificate (`gateway.server_tls`), built where uvicorn builds its own, in each worker, and a loop
    whose TLS listeners count connections from their accept (`gateway.tls_listener`)."""

    def __init__(self, app: Any, *, server: ServerConfig, **options: Any) -> None:
        super().__init__(app, **options)
        self.server = server

    def get_loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        tls = self.server.tls
        if tls is None:
            return super().get_loop_factory()
        return functools.partial(
            TlsListenerLoop,
            max_connections=self.server.max_connections,
            max_handshakes=tls.max_handshakes,
            handshake_timeout_s=self.server.header_timeout_s,
        )

    def load(self) -> None:
        super().load()
        if self.server.tls is not None:
            # uvicorn hands `ssl` untouched to the loop's create_server (TlsListenerLoop), which asks it
            # for the context of each connection it accepts. The app's own: its assembly built the
            # certificate's secrets and its vaults poll them.
            self.ssl = _gateway_app(self.loaded_app).server_tls()  # type: ignore[assignment]


def _gateway_app(app: Any) -> GatewayApp:
    """The GatewayApp uvicorn loaded, under any middleware it wrapped around it (they keep it in `.app`)."""
    from gateway.app import GatewayApp

    while not isinstance(app, GatewayApp):
        inner = getattr(app, "app", None)
        if inner is None:
            raise TypeError(f"the served application is not a GatewayApp: {type(app).__name__}")
        app = inner
    return app


@dataclass
class Listeners:
    """The listening sockets, and the identity (device, inode) of the Unix socket file this process
    created: at exit it removes that file only if it is still the same one. Another instance may have
    replaced it meanwhile, and deleting that one's file would leave it unreachable."""

    sockets: list[socket.socket] = field(default_factory=list)
    uds_path: str | None = None
    uds_file: tuple[int, int] | None = None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.uds_path is None or self.uds_file is None:
            return
        try:
            status = os.stat(self.uds_path)
        except OSError:
            return
        if (status.st_dev, status.st_ino) == self.uds_file:
            os.unlink(self.uds_path)


def listen_sockets(server: ServerConfig) -> Listeners:
    """The listening sockets: TCP on host:port unless `tcp: false`, and the Unix socket `uds`
    (mode 0660: the owner and its group may connect)."""
    listeners = Listeners()
    sockets = listeners.sockets
    try:
        if server.tcp:
            family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((server.host, server.port))
        if server.uds is not None:
            path = server.uds
            if os.path.exists(path):
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    raise ConfigError(f"server.uds: {path} exists and is not a socket; choose another path")
                if _someone_listens(path):
                    raise ConfigError(
                        f"server.uds: another process is listening on {path} (another gateway?); stop "
                        "it or choose another path"
                    )
                os.unlink(path)  # left by a process that did not remove it (killed): nobody listens
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            umask = os.umask(0o117)  # created 0660 rather than chmod-ed after the fact
            try:
                sock.bind(path)
            finally:
                os.umask(umask)
            created = os.stat(path)
            listeners.uds_path, listeners.uds_file = path, (created.st_dev, created.st_ino)
            os.chmod(path, 0o660)
    except OSError as exc:
        listeners.close()
        raise ConfigError(f"cannot listen: {exc.strerror or exc}") from None
    except ConfigError:
        listeners.close()
        raise
    for sock in sockets:
        sock.set_inheritable(True)  # passed to worker processes
    return listeners


def _someone_listens(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket `path` (a stale file refuses them)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # its backlog is full: it is there, and busy
    finally:
        probe.close()
    return True


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
