"""Run the emulator on loopback: one app, served over plain HTTP and HTTPS from a background thread.

MSAL only talks https to an authority, while the IMDS and App Service identity endpoints (and the demo's
scoring URI) are plain http in real life, so both listeners serve the same app and share one state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx
import uvicorn

from gateway.emulator.app import create_app
from gateway.emulator.msal_http import MsalHttpxClient
from gateway.emulator.state import EmulatorState
from gateway.emulator.tls import TlsFiles, generate_tls

__all__ = ["EmulatorServer", "main", "run_cli", "run_forever"]

ARM_API_VERSION = "2023-04-01"


def _bind(host: str, port: int) -> socket.socket:
    # Binding here (not in uvicorn) makes port 0 race-free: the port is ours before any thread starts.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(
        family, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )  # IPPROTO_TCP: asyncio then sets TCP_NODELAY
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class EmulatorServer:
    """The emulator on an HTTP and an HTTPS port of `host`; ports 0 mean "pick free ones".

    Use as a context manager, or call `start()` (blocks until both listeners accept) and `stop()`.
    Certificates go to `directory`, or to a temporary directory removed by `stop()`.
    """

    def __init__(
        self,
        state: EmulatorState | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        https_port: int = 0,
        directory: Path | None = None,
        graceful_shutdown_s: int = 1,
        force_stop: bool = True,
    ) -> None:
        self.state = state if state is not None else EmulatorState()
        bind_host = "127.0.0.1" if host == "localhost" else host
        self._owns_directory = directory is None
        self._directory = (
            Path(tempfile.mkdtemp(prefix="gateway-emulator-")) if directory is None else directory
        )
        self.tls: TlsFiles = generate_tls(self._directory)
        self._http_sock = _bind(bind_host, http_port)
        try:
            self._https_sock = _bind(bind_host, https_port)
        except OSError:
            self._http_sock.close()
            raise
        url_host = _url_host(bind_host)
        self.http_url = f"http://{url_host}:{self._http_sock.getsockname()[1]}"
        self.https_url = f"https://{url_host}:{self._https_sock.getsockname()[1]}"
        self.app = create_app(self.state, base_url=self.https_url)

        common: dict[str, Any] = {
            "lifespan": "off",
            # No logging config of our own (tests own the process's logging) and no access log: request
            # lines would be the only place a query-string secret could leak.
            "log_config": None,
            "log_level": None,
            "access_log": False,
            "ws": "none",
            "server_header": False,
            "timeout_graceful_shutdown": graceful_shutdown_s,
        }
        self._servers = [
            uvicorn.Server(uvicorn.Config(self.app, **common)),
            uvicorn.Server(
                uvicorn.Config(
                    self.app,
                    ssl_certfile=str(self.tls.server_cert),
                    ssl_keyfile=str(self.tls.server_key),
                    **common,
                )
            ),
        ]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._force_stop = force_stop

    # ----------------------------------------------------------------- addresses
    @property
    def ca_file(self) -> Path:
        return self.tls.ca_cert

    @property
    def authority_host(self) -> str:
        """The https origin to use as MSAL's authority host (append `/{tenant}`)."""
        return self.https_url

    def authority(self, tenant_id: str) -> str:
        return f"{self.https_url}/{tenant_id}"

    @property
    def vault_url(self) -> str:
        """The emulated Key Vault (`{vault}/secrets/{name}`); it needs a token for https://vault.azure.net."""
        return self.https_url

    @property
    def scoring_uri(self) -> str:
        return f"{self.http_url}/score"

    def arm_endpoint_url(
        self,
        operation: str | None = None,
        *,
        subscription: str = "00000000-0000-0000-0000-000000000000",
        resource_group: str = "rg",
        workspace: str = "ws",
        endpoint: str = "iris-endpoint",
        api_version: str | None = ARM_API_VERSION,
        https: bool = True,
    ) -> str:
        """URL of the online endpoint resource or one of its actions (listKeys, token, regenerateKeys)."""
        origin = self.https_url if https else self.http_url
        url = (
            f"{origin}/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{workspace}/onlineEndpoints/{endpoint}"
        )
        if operation:
            url += f"/{operation}"
        return f"{url}?api-version={api_version}" if api_version else url

    def imds_env(self) -> dict[str, str]:
        """Environment that points MSAL's VM/pod managed identity at the emulator."""
        return {"AZURE_POD_IDENTITY_AUTHORITY_HOST": self.http_url}

    def app_service_env(self) -> dict[str, str]:
        """Environment that makes MSAL use the App Service managed identity flavor against the emulator."""
        return {
            "IDENTITY_ENDPOINT": f"{self.http_url}/msi/token",
            "IDENTITY_HEADER": self.state.identity_header,
        }

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the emulator's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client that verifies the emulator's certificate and ignores proxy/CA environment
        variables. It has the requests-like `get`/`post` that MSAL's `http_client=` needs."""
        kwargs.setdefault("verify", self.ssl_context())
        kwargs.setdefault("trust_env", False)
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(**kwargs)

    def msal_http_client(self, **kwargs: Any) -> MsalHttpxClient:
        """What to pass as MSAL's `http_client=`: `http_client()` behind the bytes-safe MSAL facade."""
        return MsalHttpxClient(self.http_client(**kwargs))

    # ----------------------------------------------------------------- lifecycle
    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            # If one listener dies the emulator is half-broken; take the other one down too.
            for other in self._servers:
                other.should_exit = True

    async def _serve_all(self) -> None:
        await asyncio.gather(
            self._serve(self._servers[0], self._http_sock), self._serve(self._servers[1], self._https_sock)
        )
        # A forced exit leaves client connections open; abort them so the loop closes without leaking.
        for server in self._servers:
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
        await asyncio.sleep(0)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve_all())
        except BaseException as exc:
            # BaseException: uvicorn reports a failed startup with SystemExit, which start() must see.
            self._error = exc
        finally:
            loop.close()

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        if self._thread is not None:
            raise RuntimeError("the emulator server was already started")
        self._thread = threading.Thread(target=self._run, name="azure-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(server.started for server in self._servers):
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the emulator failed to start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the emulator did not start within {timeout} s")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            server.should_exit = True
            # Idle keep-alive TLS connections would otherwise hold shutdown for the whole graceful period
            # (asyncio waits for the client's close_notify), and hung requests are meant to be cut anyway.
            server.force_exit = self._force_stop
        if self._thread is not None:
            self._thread.join(timeout=15)
        for sock in (self._http_sock, self._https_sock):
            sock.close()
        if self._owns_directory:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------- command line
def _banner(server: EmulatorServer, tenant_id: str, client_id: str, secret: str) -> str:
    state = server.state
    keys = state.keys()
    admin = f"{server.http_url}/_emulator"
    return "\n".join(
        [
            "Azure ML emulator running (local only; it never contacts Azure).",
            f"  plain HTTP   {server.http_url}   scoring, managed identity, ARM, admin",
            f"  HTTPS        {server.https_url}  the same, plus the Entra ID authority host",
            f"  CA file      {server.ca_file}",
            "",
            "Scoring endpoint",
            f"  scoring URI    {server.scoring_uri}   (also {server.https_url}/score)",
            f"  primary key    {keys['primary']}",
            f"  secondary key  {keys['secondary']}",
            "Entra ID (MSAL: authority=<authority>, instance_discovery=False, http_client trusting the CA)",
            f"  authority      {server.authority(tenant_id)}",
            f"  tenant id      {tenant_id}",
            f"  client id      {client_id}",
            f"  client secret  {secret}",
            "ARM (any subscription / resource group / workspace / endpoint name)",
            f"  listKeys       POST {server.arm_endpoint_url('listKeys')}",
            "Key Vault (tokens for https://vault.azure.net; publish versions with the admin API)",
            f"  vault          {server.vault_url}   secrets at {server.vault_url}/secrets/<name>",
            "Managed identity",
            f"  IMDS           AZURE_POD_IDENTITY_AUTHORITY_HOST={server.http_url}",
            f"  App Service    IDENTITY_ENDPOINT={server.http_url}/msi/token",
            f"                 IDENTITY_HEADER={state.identity_header}",
            "Admin",
            f"  regenerate     curl -X POST {admin}/keys/regenerate -H 'content-type: application/json' "
            """-d '{"slot": "primary"}'""",
            f"  secret         curl -X POST {admin}/secrets -H 'content-type: application/json' "
            """-d '{"name": "iris-primary", "value": "..."}'""",
            f"  counters       curl {admin}/state",
            f"  faults         curl -X POST {admin}/faults -H 'content-type: application/json' "
            """-d '{"target": "score", "status": 503, "count": 3}'""",
            "",
            "Press Ctrl-C to stop.",
        ]
    )


def run_forever(host: str, http_port: int, https_port: int) -> int:
    """Serve a fresh emulator (with one registered demo app) until SIGINT/SIGTERM; return an exit code."""
    state = EmulatorState()
    tenant_id, client_id, secret = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    state.add_app(tenant_id, client_id, secret=secret)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        try:
            server = EmulatorServer(state, host=host, http_port=http_port, https_port=https_port).start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            print(f"error: cannot start the emulator: {exc}", file=sys.stderr)
            return 1
        try:
            print(_banner(server, tenant_id, client_id, secret), flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
        print("emulator stopped", flush=True)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_cli(host: str, port: int, tls_port: int | None) -> int:
    """Entry point for `gateway emulator --port P [--tls-port P2]` (TLS port picked freely if None)."""
    return run_forever(host, port, tls_port if tls_port is not None else 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="plain HTTP port (default: any free port)")
    parser.add_argument("--tls-port", type=int, default=None, help="HTTPS port (default: any free port)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return run_cli(args.host, args.port, args.tls_port)
    return 130


if __name__ == "__main__":
    sys.exit(main())
