"""Egress through a real forward proxy (proxy.py, the `test` extra): CONNECT tunnels with TLS to the
origin inside, absolute-form requests for http origins, proxy authentication, `no_proxy`, the proxy
variables of the environment, and every outbound client of the gateway (upstreams, MSAL, ARM, the App
Service identity endpoint, `gateway check`).

A counting relay sits in front of the proxy: it forwards bytes unchanged and keeps what the gateway sent,
so a test can prove that traffic crossed the proxy (and which CONNECT or absolute-form request it was).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure_env import (
    clean_emulator_fixture,  # noqa: F401 - fixture
    emulator_fixture,  # noqa: F401 - fixture
    endpoint_ref,
    identity,
    register_app,
    run,
    wait_for,
)
from conftest import PRIMARY
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import ServerThread
from upstream import Upstream

from gateway.check import run_check
from gateway.config import parse_config
from gateway.emulator.server import EmulatorServer
from gateway.errors import ConfigError

PROXY_USER = "gateway"
PROXY_PASSWORD = "proxy-pass-5b1f0c9e7d"  # registered for redaction when the gateway loads it
ROWS = {"data": [[5.1, 3.5, 1.4, 0.2]]}
_REQUEST_LINE = re.compile(r"^(CONNECT|GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) (\S+) HTTP/1\.[01]$")
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


# ------------------------------------------------------------------------------------------ the proxy
class ForwardProxy:
    """proxy.py in a subprocess on a free loopback port (optionally with Basic authentication)."""

    def __init__(self, directory: Path, basic_auth: str | None = None, plugin: str | None = None) -> None:
        self.port_file = directory / "proxy.port"
        self.log_file = directory / "proxy.log"
        command = [
            sys.executable,
            "-m",
            "proxy",
            "--hostname",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--num-acceptors",
            "1",
            "--num-workers",
            "1",
            "--threaded",
            "--log-file",
            str(self.log_file),
        ]
        if basic_auth is not None:
            command += ["--basic-auth", basic_auth]
        environment = None
        if plugin is not None:
            # A plugin module from tests/ (e.g. proxy_policy.ForbidEverything).
            command += ["--plugins", plugin]
            environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy.py exited with {self.process.returncode}")
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("proxy.py did not start within 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Relay:
    """A byte-for-byte TCP relay in front of the proxy that keeps what each client connection sent."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.address = f"{host}:{self.port}"
        self.lock = threading.Lock()
        self.streams: list[bytearray] = []
        self.closed_by_client = 0  # connections whose client side ended (the gateway closed them)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            record = bytearray()
            with self.lock:
                self.streams.append(record)
            for source, sink, keep in ((client, upstream, record), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(source, sink, keep), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := source.recv(65536):
                if keep is not None and len(keep) < 256 * 1024:
                    with self.lock:
                        keep += data
                sink.sendall(data)
            if keep is not None:
                with self.lock:
                    self.closed_by_client += 1
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def request_lines(self) -> list[str]:
        """Every HTTP request line the gateway sent to the proxy: CONNECTs and absolute-form requests."""
        with self.lock:
            texts = [bytes(s).decode("latin-1") for s in self.streams]
        return [line for text in texts for line in text.split("\r\n") if _REQUEST_LINE.match(line)]

    def sent(self) -> str:
        with self.lock:
            return "\n".join(bytes(s).decode("latin-1") for s in self.streams)

    def clear(self) -> None:
        with self.lock:
            self.streams.clear()

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(tmp_path_factory.mktemp("proxy"))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    proxy = ForwardProxy(tmp_path_factory.mktemp("auth-proxy"), f"{PROXY_USER}:{PROXY_PASSWORD}")
    yield proxy
    proxy.stop()


@pytest.fixture
def relay(forward_proxy: ForwardProxy) -> Iterator[Relay]:
    relay = Relay(forward_proxy.port)
    yield relay
    relay.close()


@pytest.fixture
def auth_relay(auth_proxy: ForwardProxy) -> Iterator[Relay]:
    relay = Relay(auth_proxy.port)
    yield relay
    relay.close()


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the proxy variables they mean; none come from the machine."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# ------------------------------------------------------------------------------------------ helpers
def _emulator_origin(emulator: EmulatorServer, host: str, *, https: bool = True) -> str:
    port = (emulator.https_url if https else emulator.http_url).rsplit(":", 1)[1]
    return f"{'https' if https else 'http'}://{host}:{port}"


def _key_config(emulator: EmulatorServer, upstream: str, egress: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "server": {"access_log": False},
        "routes": {
            "iris": {
                "path": "/iris",
                "upstream": upstream,
                "auth": {"type": "key", "primary": emulator.state.keys()["primary"]},
                "retry": {"attempts": 1},
            }
        },
    }
    if egress is not None:
        config["egress"] = egress
    return config


def _score(gateway: ServerThread, route: str = "iris") -> httpx.Response:
    return httpx.post(f"{gateway.url}/{route}/score", json=ROWS, timeout=30, trust_env=False)


# ------------------------------------------------------------------------------------------ no_proxy matcher
def test_no_proxy_matches_names_suffixes_addresses_and_networks() -> None:
    from gateway.egress import NoProxy

    rules = NoProxy(
        ["localhost", "example.com", ".internal", "*.corp", "10.1.2.3", "192.168.0.0/16", "[::1]"]
    )
    assert rules.matches("localhost") and rules.matches("LOCALHOST.")
    assert rules.matches("example.com") and rules.matches("api.example.com")
    assert not rules.matches("notexample.com") and not rules.matches("example.com.evil")
    assert rules.matches("ml.internal") and rules.matches("a.b.internal") and not rules.matches("internal")
    assert rules.matches("x.corp") and not rules.matches("xcorp")
    assert rules.matches("10.1.2.3") and not rules.matches("10.1.2.4")
    assert rules.matches("192.168.7.9") and not rules.matches("192.169.0.1")
    assert rules.matches("::1") and rules.matches("[::1]")
    assert not rules.matches("127.0.0.1")  # loopback is proxied unless listed
    assert NoProxy(["*"]).matches("anything.example")
    assert not NoProxy([]).matches("localhost")
    for bad in ("exa mple.com", "10.0.0.0/33", "http://x", ""):
        with pytest.raises(ValueError):
            NoProxy([bad])


def test_proxy_selection_from_the_config_and_the_environment() -> None:
    from gateway.config import EgressConfig
    from gateway.egress import build_egress

    def build(config: dict[str, Any], env: dict[str, str]) -> Any:
        return build_egress(EgressConfig.model_validate(config), "test.yaml", env)

    env = {
        "HTTPS_PROXY": "http://secure-proxy:3128",
        "http_proxy": "plain-proxy:8080",
        "NO_PROXY": "localhost,127.0.0.1,.svc,10.0.0.0/8,bad entry,example.org:8443",
    }
    egress = build({}, env)
    assert egress.proxy_for("https", "ml.azure.com").address == "secure-proxy:3128"
    assert egress.proxy_for("http", "scoring.example").address == "plain-proxy:8080"
    for direct in ("localhost", "127.0.0.1", "api.default.svc", "10.2.3.4", "example.org"):
        assert egress.proxy_for("https", direct) is None, direct
    assert egress.proxy_for("https", "::1") is not None
    assert egress.proxy_for("http", "169.254.169.254") is None  # IMDS: always direct

    lower_wins = build({}, {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"})
    assert lower_wins.proxy_for("https", "x").address == "lower:1"
    assert lower_wins.proxy_for("http", "x") is None  # no http_proxy: http origins go direct

    assert build({"proxy": "none"}, env).proxy_for("https", "ml.azure.com") is None
    configured = build({"proxy": "http://corp-proxy:3128", "no_proxy": [".internal"]}, env)
    assert configured.proxy_for("http", "x.example").address == "corp-proxy:3128"
    assert configured.proxy_for("https", "localhost").address == "corp-proxy:3128"  # NO_PROXY not used
    assert configured.proxy_for("https", "kv.internal") is None
    assert configured.describe("https://kv.internal") == "direct (no_proxy)"
    assert configured.describe("https://ml.azure.com") == "through the proxy corp-proxy:3128"

    # A managed identity endpoint on this host or its link is always direct; elsewhere, the policy.
    identity = configured.for_identity_endpoint()
    for local in ("127.0.0.1", "127.0.0.53", "localhost", "LOCALHOST.", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert identity.proxy_for("http", local) is None, local
        assert configured.proxy_for("http", local) is not None, local  # upstreams: as curl does
    for link_local in ("169.254.169.253", "fe80::1"):
        assert identity.proxy_for("http", link_local) is None, link_local
    for elsewhere in ("10.0.0.4", "identity.example", "localhost.example", "127.0.0.1.nip.io"):
        assert identity.proxy_for("https", elsewhere).address == "corp-proxy:3128", elsewhere
    assert identity.proxy_for("https", "kv.internal") is None  # no_proxy still applies
    assert identity.describe("http://localhost:42356") == "direct (identity endpoint on this host)"

    with_credentials = build({}, {"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@p:3128"})
    proxy = with_credentials.proxy_for("https", "x")
    expected = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    assert proxy.basic_credentials() == f"Basic {expected}"
    assert PROXY_PASSWORD not in repr(proxy) + repr(with_credentials) + proxy.address

    with pytest.raises(ConfigError, match="HTTPS_PROXY: the proxy must be an http://host:port URL"):
        build({}, {"HTTPS_PROXY": "socks5://p:1080"})


def test_rotated_proxy_credentials_are_used_from_the_next_connection(tmp_path: Path) -> None:
    from gateway.egress import Proxy, absolute_form
    from gateway.secrets import FileSecret

    path = tmp_path / "proxy-auth"
    path.write_text(f"{PROXY_USER}:{PROXY_PASSWORD}\n")
    secret = FileSecret(path)
    proxy = Proxy("proxy", 3128, auth=secret)
    head = b"POST /score HTTP/1.1\r\nHost: u:8080\r\nContent-Length: 2\r\n\r\n"
    first = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode())
    assert absolute_form(head, b"http://u:8080", proxy) == (
        b"POST http://u:8080/score HTTP/1.1\r\nProxy-Authorization: Basic " + first + b"\r\n"
        b"Host: u:8080\r\nContent-Length: 2\r\n\r\n"
    )
    path.write_text(f"{PROXY_USER}:rotated-{PROXY_PASSWORD}\n")
    secret.refresh()
    rotated = base64.b64encode(f"{PROXY_USER}:rotated-{PROXY_PASSWORD}".encode()).decode()
    assert proxy.basic_credentials() == f"Basic {rotated}"
    assert PROXY_PASSWORD not in repr(proxy) + str(proxy)


def test_rotated_proxy_credentials_close_the_transports_they_replaced(
    emulator: EmulatorServer, relay: Relay, tmp_path: Path
) -> None:
    """The Azure clients keep a pool per value of the proxy's credentials: once a rotated value is in
    use, the connections made with the old one are closed, not left open for the life of the process."""
    from gateway.egress import Egress, Proxy
    from gateway.secrets import FileSecret

    path = tmp_path / "proxy-auth"
    path.write_text(f"{PROXY_USER}:first-{PROXY_PASSWORD}\n")
    secret = FileSecret(path)
    host, port = relay.address.rsplit(":", 1)
    egress = Egress(https_proxy=Proxy(host, int(port), auth=secret))

    async def scenario() -> None:
        async with egress.httpx_async_client(emulator.ssl_context(), httpx.Timeout(10)) as client:
            assert (await client.get(f"{emulator.https_url}/")).status_code == 200
            path.write_text(f"{PROXY_USER}:second-{PROXY_PASSWORD}\n")
            assert secret.refresh()
            assert (await client.get(f"{emulator.https_url}/")).status_code == 200
            assert len(relay.request_lines()) == 2  # a tunnel per value of the credentials
            assert await wait_for(lambda: relay.closed_by_client >= 1, 10), "the old tunnel stays open"
            assert (await client.get(f"{emulator.https_url}/")).status_code == 200  # the new one is reused
            assert len(relay.request_lines()) == 2

    run(scenario())


@pytest.mark.parametrize(
    ("egress", "message"),
    [
        ({"proxy": "http://p:3128", "proxies": []}, "egress.proxies: unknown key"),
        ({"proxy": "http://u:pw@p:3128"}, "put the proxy's credentials in egress.proxy_auth"),
        ({"proxy": "http://p"}, "the proxy URL needs a port"),
        ({"proxy": "https://p:3128"}, "must be an http://host:port URL"),
        ({"no_proxy": ["10.0.0.0/40"]}, "is not a CIDR"),
        ({"proxy": "none", "proxy_auth": "user:password"}, "`proxy: none` uses none"),
    ],
)
def test_egress_config_errors_say_what_is_wrong(egress: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {
                "egress": egress,
                "routes": {"r": {"path": "/r", "upstream": "http://u:1", "auth": {"type": "none"}}},
            }
        )
    assert message in str(raised.value)
    assert "pw@" not in str(raised.value)


# ------------------------------------------------------------------------------------------ upstreams
def test_https_upstream_goes_through_a_connect_tunnel(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any
) -> None:
    upstream = _emulator_origin(emulator, "localhost")
    gateway = gateway_factory(_key_config(emulator, upstream, {"proxy": relay.url}))
    for _ in range(3):
        response = _score(gateway)
        assert response.status_code == 200, response.text
    port = upstream.rsplit(":", 1)[1]
    # One tunnel, kept alive and reused; the request itself travelled inside TLS (invisible here).
    assert relay.request_lines() == [f"CONNECT localhost:{port} HTTP/1.1"]
    assert "/score" not in relay.sent()


class _SniServer:
    """A TLS server whose certificate names only `localhost`; it records the SNI each client sent."""

    def __init__(self, directory: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        self.ca_file = directory / "sni-ca.pem"
        self.ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file = directory / "sni-key.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.ca_file, key_file)
        self.names: list[str | None] = []
        self.context.sni_callback = lambda _sock, server_name, _ctx: self.names.append(server_name)  # type: ignore[assignment,func-returns-value]
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(raw,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                body = b'{"answered": "sni-server"}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def close(self) -> None:
        self.server.close()


def test_tls_through_the_tunnel_checks_the_origin_name_not_the_proxy_name(
    forward_proxy: ForwardProxy, gateway_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _SniServer(tmp_path)
    by_ip, by_name = Relay(forward_proxy.port), Relay(forward_proxy.port, host="localhost")
    try:

        def config(upstream: str, proxy: str) -> dict[str, Any]:
            return {
                "tls": {"ca_bundle": str(server.ca_file)},
                "server": {"access_log": False},
                "egress": {"proxy": proxy},
                "routes": {
                    "iris": {
                        "path": "/iris",
                        "upstream": upstream,
                        "auth": {"type": "none"},
                        "retry": {"attempts": 1},
                    }
                },
            }

        # The certificate names localhost, the proxy is 127.0.0.1: SNI and the check use the origin.
        gateway = gateway_factory(config(f"https://localhost:{server.port}", by_ip.url))
        response = _score(gateway)
        assert response.status_code == 200, response.text
        assert response.json() == {"answered": "sni-server"}
        assert server.names == ["localhost"]
        assert by_ip.request_lines() == [f"CONNECT localhost:{server.port} HTTP/1.1"]

        # The other way round (proxy called localhost, origin 127.0.0.1) must fail: checking against
        # the proxy's name would wrongly accept the certificate.
        gateway = gateway_factory(config(f"https://127.0.0.1:{server.port}", by_name.url))
        caplog.set_level(logging.WARNING, logger="gateway.failures")
        response = _score(gateway)
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "upstream_unreachable"
        assert "not valid for its host name" in response.json()["error"]["message"]
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "gateway.failures")
        assert "(tls_name_mismatch)" in logged and "not valid for the name 127.0.0.1" in logged, logged
        assert "it holds DNS:localhost" in logged and f"via the egress proxy {by_name.address}" in logged
        # The second CONNECT is the gateway reading the refused certificate for that line (it sends nothing).
        assert by_name.request_lines() == [f"CONNECT 127.0.0.1:{server.port} HTTP/1.1"] * 2
    finally:
        by_ip.close()
        by_name.close()
        server.close()


def test_http_upstream_is_sent_to_the_proxy_in_absolute_form(
    relay: Relay, gateway_factory: Any, upstream: tuple[Upstream, ServerThread]
) -> None:
    app, server = upstream
    origin = server.url.replace("127.0.0.1", "localhost")
    gateway = gateway_factory(
        {
            "server": {"access_log": False},
            "egress": {"proxy": relay.url},
            "routes": {
                "iris": {"path": "/iris", "upstream": origin, "auth": {"type": "key", "primary": PRIMARY}}
            },
        }
    )
    response = httpx.post(f"{gateway.url}/iris/echo?x=1", content=b"{}", timeout=30, trust_env=False)
    assert response.status_code == 200, response.text
    assert relay.request_lines() == [f"POST {origin}/echo?x=1 HTTP/1.1"]
    (seen,) = app.requests
    headers = dict(seen["headers"])
    assert headers["host"] == origin.removeprefix("http://")
    assert headers["authorization"] == f"Bearer {PRIMARY}"
    assert "proxy-authorization" not in headers


def test_no_proxy_keeps_listed_origins_direct(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any
) -> None:
    for host, no_proxy in (
        ("localhost", ["localhost"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("127.0.0.1", ["127.0.0.0/8"]),
    ):
        egress = {"proxy": relay.url, "no_proxy": no_proxy}
        gateway = gateway_factory(_key_config(emulator, _emulator_origin(emulator, host), egress))
        assert _score(gateway).status_code == 200
    assert relay.request_lines() == []

    # A CIDR matches addresses as written in the URL, never a resolved name: localhost is proxied.
    egress = {"proxy": relay.url, "no_proxy": ["127.0.0.0/8"]}
    gateway = gateway_factory(_key_config(emulator, _emulator_origin(emulator, "localhost"), egress))
    assert _score(gateway).status_code == 200
    assert len(relay.request_lines()) == 1


def test_environment_variables_are_honoured_and_proxy_none_ignores_them(
    emulator: EmulatorServer,
    relay: Relay,
    gateway_factory: Any,
    upstream: tuple[Upstream, ServerThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, plain = upstream
    https_origin = _emulator_origin(emulator, "localhost")

    monkeypatch.setenv("HTTPS_PROXY", relay.url)  # upper case
    gateway = gateway_factory(_key_config(emulator, https_origin, None))
    assert _score(gateway).status_code == 200
    assert relay.request_lines() == [f"CONNECT {https_origin.removeprefix('https://')} HTTP/1.1"]
    relay.clear()

    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("http_proxy", relay.url)  # lower case, for http origins only
    monkeypatch.setenv("https_proxy", relay.url)
    monkeypatch.setenv("no_proxy", "localhost")
    gateway = gateway_factory(
        {
            "server": {"access_log": False},
            "routes": {
                "iris": {"path": "/iris", "upstream": plain.url, "auth": {"type": "key", "primary": PRIMARY}}
            },
        }
    )
    assert (
        httpx.post(f"{gateway.url}/iris/echo", content=b"{}", timeout=30, trust_env=False).status_code == 200
    )
    assert relay.request_lines() == [f"POST {plain.url}/echo HTTP/1.1"]
    relay.clear()
    gateway = gateway_factory(_key_config(emulator, https_origin, None))  # localhost: in no_proxy
    assert _score(gateway).status_code == 200
    assert relay.request_lines() == []

    monkeypatch.setenv("no_proxy", "")
    gateway = gateway_factory(_key_config(emulator, https_origin, {"proxy": "none"}))
    assert _score(gateway).status_code == 200
    assert relay.request_lines() == []


def test_proxy_refusal_is_502_and_a_silent_proxy_is_bounded_by_connect_timeout(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The proxy cannot reach the origin: proxy.py answers CONNECT with 502.
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    gateway = gateway_factory(_key_config(emulator, f"https://localhost:{dead_port}", {"proxy": relay.url}))
    caplog.set_level(logging.WARNING, logger="gateway.failures")
    response = _score(gateway)
    assert response.status_code == 502, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("route iris: the egress proxy refused the connection to the upstream")
    assert relay.address not in message and str(dead_port) not in message
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "gateway.failures")
    assert f"the egress proxy {relay.address} refused the tunnel to localhost:{dead_port}: 502" in logged

    # A proxy that accepts and never answers CONNECT: connect_timeout_s bounds the exchange.
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    try:
        config = _key_config(
            emulator,
            _emulator_origin(emulator, "localhost"),
            {"proxy": f"http://127.0.0.1:{silent.getsockname()[1]}"},
        )
        config["routes"]["iris"]["connect_timeout_s"] = 0.5
        gateway = gateway_factory(config)
        started = time.monotonic()
        response = _score(gateway)
        # A connect timeout (TCP, TLS or the proxy's CONNECT) is the gateway timing out: 504.
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "upstream_timeout"
        message = response.json()["error"]["message"]
        assert "connect_timeout_s" in message and "127.0.0.1" not in message
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "gateway.failures")
        assert f"through the egress proxy 127.0.0.1:{silent.getsockname()[1]} within 0.5 s" in logged
        assert "the egress proxy 127.0.0.1:" in logged and "answer to CONNECT" in logged, logged
        assert time.monotonic() - started < 20  # 0.5 s, with a wide margin for a loaded machine
        assert held, "the gateway never connected to the proxy"
    finally:
        silent.close()
        for sock in held:
            sock.close()


def test_proxy_credentials_are_sent_and_a_refusal_is_502_naming_the_proxy(
    emulator: EmulatorServer,
    auth_relay: Relay,
    gateway_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    origin = _emulator_origin(emulator, "localhost")
    monkeypatch.setenv("TEST_PROXY_AUTH", f"{PROXY_USER}:{PROXY_PASSWORD}")
    gateway = gateway_factory(
        _key_config(emulator, origin, {"proxy": auth_relay.url, "proxy_auth": {"env": "TEST_PROXY_AUTH"}})
    )
    assert _score(gateway).status_code == 200
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    assert f"Proxy-Authorization: Basic {encoded}\r\n" in auth_relay.sent()

    # The same credentials in the proxy variable's URL, as curl takes them.
    auth_relay.clear()
    monkeypatch.setenv("HTTPS_PROXY", auth_relay.url.replace("//", f"//{PROXY_USER}:{PROXY_PASSWORD}@"))
    assert _score(gateway_factory(_key_config(emulator, origin, None))).status_code == 200
    assert f"Proxy-Authorization: Basic {encoded}\r\n" in auth_relay.sent()
    monkeypatch.delenv("HTTPS_PROXY")

    caplog.set_level(logging.WARNING, logger="gateway")
    config = _key_config(emulator, origin, {"proxy": auth_relay.url})
    config["routes"]["iris"]["retry"] = {"attempts": 3}
    gateway = gateway_factory(config)
    auth_relay.clear()
    response = _score(gateway)
    assert response.status_code == 502, response.text
    # The proxy's refusal is the proxy's policy, not the upstream failing: not replayed (it would be
    # refused again) and not counted against the upstream (it would eject healthy upstreams).
    connects = [line for line in auth_relay.request_lines() if line.startswith("CONNECT ")]
    assert len(connects) == 1, connects
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert "the egress proxy refused the connection" in error["message"]
    assert auth_relay.address not in error["message"] and "Proxy Authentication" not in error["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"the egress proxy {auth_relay.address} refused the tunnel" in logged and "407" in logged
    assert PROXY_PASSWORD not in logged + response.text and encoded not in logged + response.text


def _http10(gateway: ServerThread, route: str = "iris") -> tuple[int, str]:
    """One HTTP/1.0 request on a raw socket: the status and the body, read until the gateway closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"POST /%s/score HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}" % route.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("latin-1")


def test_http10_clients_502_for_a_proxy_refusal_names_the_class_and_route_only(
    emulator: EmulatorServer,
    relay: Relay,
    auth_relay: Relay,
    gateway_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 19 item 11 for an HTTP/1.0 client: whether the proxy refuses the tunnel by policy (407) or
    cannot reach the origin (502), the body names the failure class and the route, never the proxy's
    address, the origin's host:port or the proxy's reason phrase; the log line has them."""
    caplog.set_level(logging.WARNING, logger="gateway.failures")
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    origin = _emulator_origin(emulator, "localhost")
    cases = [
        (auth_relay, origin, "407"),  # no credentials configured: Proxy Authentication Required
        (relay, f"https://localhost:{dead_port}", "502"),  # the proxy's Bad Gateway
    ]
    for proxy, upstream, proxy_status in cases:
        gateway = gateway_factory(_key_config(emulator, upstream, {"proxy": proxy.url}))
        status, body = _http10(gateway)
        assert status == 502, body
        error = json.loads(body)["error"]
        assert error["code"] == "upstream_unreachable"
        assert error["message"].startswith(
            "route iris: the egress proxy refused the connection to the upstream"
        ), error
        origin_address = upstream.removeprefix("https://")
        for detail in (proxy.address, origin_address, "localhost", "127.0.0.1", proxy_status):
            assert detail not in error["message"], (detail, error)
        for phrase in ("Proxy Authentication Required", "Bad Gateway", "Forbidden"):
            assert phrase not in body, (phrase, body)
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "gateway.failures")
        assert f"the egress proxy {proxy.address} refused the tunnel to {origin_address}" in logged
        assert proxy_status in logged


# ------------------------------------------------------------------ MSAL, ARM, managed identity
def _aad_config(emulator: EmulatorServer, egress: dict[str, Any], auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "server": {"access_log": False},
        "egress": egress,
        "routes": {"aad": {"path": "/aad", "upstream": emulator.http_url, "auth": auth}},
    }


def test_entra_id_token_requests_go_through_the_proxy(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any
) -> None:
    app = register_app(emulator)
    authority = _emulator_origin(emulator, "localhost")
    auth = {"type": "aad_token", "identity": identity(emulator, app, authority_host=authority)}
    # The scoring upstream stays direct (127.0.0.1); Entra ID (localhost) goes through the proxy.
    gateway = gateway_factory(_aad_config(emulator, {"proxy": relay.url, "no_proxy": ["127.0.0.1"]}, auth))
    response = _score(gateway, "aad")
    assert response.status_code == 200, response.text
    assert emulator.state.token_request_count(app.client_id) == 1
    assert set(relay.request_lines()) == {f"CONNECT {authority.removeprefix('https://')} HTTP/1.1"}


def test_arm_calls_go_through_the_proxy(emulator: EmulatorServer, relay: Relay, gateway_factory: Any) -> None:
    app = register_app(emulator)
    authority = _emulator_origin(emulator, "127.0.0.1")
    arm = _emulator_origin(emulator, "localhost")
    auth = {
        "type": "aml_token",
        "identity": identity(emulator, app, authority_host=authority),
        "endpoint": endpoint_ref(),
        "arm_url": arm,
    }
    # Only ARM (localhost) through the proxy: Entra ID and the scoring endpoint stay direct.
    gateway = gateway_factory(_aad_config(emulator, {"proxy": relay.url, "no_proxy": ["127.0.0.1"]}, auth))
    response = _score(gateway, "aad")
    assert response.status_code == 200, response.text
    assert set(relay.request_lines()) == {f"CONNECT {arm.removeprefix('https://')} HTTP/1.1"}


def test_signing_keys_are_read_through_the_proxy_with_the_ca_bundle(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """`inbound.entra_id`'s start-up read (discovery, then the key set) takes the gateway's egress proxy
    and trusts `tls.ca_bundle` inside the tunnel; with the proxy stopped, start-up is a ConfigError naming
    the discovery URL."""
    from gateway.assembly import Assembly

    tenant = "5e1f0000-0000-4000-8000-0000000000e9"
    authority = _emulator_origin(emulator, "localhost")  # the key set URL the emulator gives: 127.0.0.1
    discovery = f"{authority}/{tenant}/v2.0/.well-known/openid-configuration"

    def start(proxy_url: str, *, ca_bundle: bool = True) -> Assembly:
        data: dict[str, Any] = {
            "egress": {"proxy": proxy_url},
            "inbound": {"entra_id": {"tenant_id": tenant, "audiences": ["api://gw"], "authority": authority}},
            "routes": {"r": {"path": "/r", "upstream": "http://127.0.0.1:9", "auth": {"type": "none"}}},
        }
        if ca_bundle:
            data["tls"] = {"ca_bundle": str(emulator.ca_file)}

        async def create() -> Assembly:
            assembly = await Assembly.create(parse_config(data, "test.yaml"), "test.yaml", callers=True)
            await assembly.rest.close()
            return assembly

        return run(create())

    proxy = ForwardProxy(tmp_path)
    relay = Relay(proxy.port)
    try:
        discoveries, key_sets = emulator.state.discovery_count, emulator.state.jwks_count
        assembly = start(relay.url)
        keys = assembly._prepared_keys
        assert keys is not None and keys.ready and keys.key(emulator.state.signing_kid) is not None
        assert emulator.state.discovery_count == discoveries + 1 and emulator.state.jwks_count == key_sets + 1
        port = emulator.https_url.rsplit(":", 1)[1]
        assert set(relay.request_lines()) == {
            f"CONNECT localhost:{port} HTTP/1.1",  # discovery
            f"CONNECT 127.0.0.1:{port} HTTP/1.1",  # the key set
        }

        # Inside the tunnel the emulator's certificate is checked against tls.ca_bundle, not the system's.
        relay.clear()
        with pytest.raises(ConfigError) as untrusted:
            start(relay.url, ca_bundle=False)
        assert f"the TLS certificate of {discovery} is not trusted" in str(untrusted.value)
        assert relay.request_lines() == [f"CONNECT localhost:{port} HTTP/1.1"]
    finally:
        relay.close()
        proxy.stop()

    discoveries = emulator.state.discovery_count
    with pytest.raises(ConfigError) as stopped:
        start(f"http://127.0.0.1:{proxy.port}")
    message = str(stopped.value)
    assert "inbound.entra_id: cannot read Entra ID's signing keys" in message, message
    assert f"cannot reach {discovery}" in message, message
    assert emulator.state.discovery_count == discoveries  # it never went round the proxy


def test_imds_never_goes_through_the_proxy(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    egress = {"proxy": relay.url, "no_proxy": ["localhost"]}  # scoring upstream direct, below
    auth = {"type": "aad_token", "identity": {"managed_identity": "system", "timeout_s": 5}}
    config = _aad_config(emulator, egress, auth)
    config["routes"]["aad"]["upstream"] = _emulator_origin(emulator, "localhost", https=False)
    for name, value in emulator.imds_env().items():
        monkeypatch.setenv(name, value)
    assert _score(gateway_factory(config), "aad").status_code == 200
    assert relay.request_lines() == []  # IMDS (here the emulator at 127.0.0.1): always direct


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["app-service", "container-apps"])
def test_a_loopback_identity_endpoint_is_reached_directly_never_through_the_proxy(
    emulator: EmulatorServer, relay: Relay, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """App Service (127.0.0.1) and Container Apps (localhost) serve the managed identity endpoint on the
    host itself, and its X-IDENTITY-HEADER is a secret: sent through the proxy it crossed the network in
    clear (and a proxy elsewhere could not reach the endpoint anyway). Like IMDS, always direct."""
    egress = {"proxy": relay.url}  # no no_proxy: the scoring upstream goes through the proxy
    auth = {"type": "aad_token", "identity": {"managed_identity": "system", "timeout_s": 5}}
    config = _aad_config(emulator, egress, auth)
    config["routes"]["aad"]["upstream"] = _emulator_origin(emulator, "localhost", https=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", _emulator_origin(emulator, host, https=False) + "/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", emulator.state.identity_header)
    assert _score(gateway_factory(config), "aad").status_code == 200
    lines = relay.request_lines()
    assert any(line.startswith("POST http://localhost:") for line in lines), lines  # the scoring request
    assert not [line for line in lines if "/msi/token" in line], lines
    assert emulator.state.identity_header not in relay.sent()


# ------------------------------------------------------------------------------------------ gateway check
def test_check_says_how_each_origin_is_reached_and_tests_the_tunnel(
    emulator: EmulatorServer,
    relay: Relay,
    auth_relay: Relay,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = register_app(emulator)
    arm = _emulator_origin(emulator, "localhost")
    data = {
        "tls": {"ca_bundle": str(emulator.ca_file)},
        "egress": {"proxy": relay.url, "no_proxy": ["127.0.0.1"]},
        "routes": {
            "aml": {
                "path": "/aml",
                "upstream": emulator.http_url,
                "auth": {
                    "type": "aml_token",
                    "identity": identity(emulator, app),
                    "endpoint": endpoint_ref(),
                    "arm_url": arm,
                },
            }
        },
    }
    code = asyncio.run(run_check(parse_config(data), "test.yaml"))
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("http://", "https://"))}
    assert f"through the proxy {relay.address}" in lines[arm] and "tunnel ok" in lines[arm]
    assert "direct (no_proxy)" in lines[emulator.https_url] and "ARM" not in lines[emulator.https_url]
    assert "Entra ID for aml" in lines[emulator.https_url]
    assert "direct (no_proxy)" in lines[emulator.http_url]
    assert f"CONNECT {arm.removeprefix('https://')} HTTP/1.1" in relay.request_lines()

    monkeypatch.setenv("TEST_PROXY_AUTH", f"{PROXY_USER}:not-the-password")
    data["egress"] = {
        "proxy": auth_relay.url,
        "no_proxy": ["127.0.0.1"],
        "proxy_auth": {"env": "TEST_PROXY_AUTH"},
    }
    code = asyncio.run(run_check(parse_config(data), "test.yaml"))
    out = capsys.readouterr().out
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith(arm)]
    assert f"FAILED (the egress proxy {auth_relay.address} refused the tunnel to localhost:" in line
    assert "407" in line and "not-the-password" not in out


def test_check_names_the_proxy_it_cannot_reach(
    emulator: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    data = _key_config(
        emulator, _emulator_origin(emulator, "localhost"), {"proxy": f"http://127.0.0.1:{port}"}
    )
    code = asyncio.run(run_check(parse_config(data), "test.yaml"))
    out = capsys.readouterr().out
    assert code == 1
    assert f"cannot connect to the egress proxy 127.0.0.1:{port}" in out


def test_a_reload_warns_about_egress_against_the_running_policy(
    no_proxy_variables: None, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.app import GatewayApp

    def config(egress: dict[str, Any]) -> Any:
        route = {"path": "/iris", "upstream": "http://127.0.0.1:9", "auth": {"type": "none"}}
        return parse_config({"egress": egress, "routes": {"iris": route}})

    running = config({"proxy": "none"})
    app = GatewayApp(running)
    caplog.set_level(logging.WARNING, logger="gateway")

    def egress_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("egress settings")]

    asyncio.run(app.reload(config({"proxy": "http://127.0.0.1:3128"})))
    assert len(egress_warnings()) == 1  # not applied: the running policy stays until a restart
    asyncio.run(app.reload(config({"proxy": "http://127.0.0.1:3128"})))
    assert len(egress_warnings()) == 2  # still not applied: said again
    asyncio.run(app.reload(running))
    assert len(egress_warnings()) == 2  # back to the running policy: nothing to warn about
