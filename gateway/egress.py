"""Egress: which outbound connections go through a forward proxy, and how.

One `Egress` per process decides for every origin the gateway talks to (upstreams, Entra ID, the App
Service identity endpoint, ARM): direct, or through an HTTP proxy. https origins go through a `CONNECT`
tunnel with TLS to the origin inside it (SNI and the certificate's name are the origin's, never the
proxy's); http origins are sent to the proxy in absolute form (`GET http://host:port/path`).

The policy comes from the top-level `egress` section, else from the variables curl and the Azure SDKs
read (`https_proxy`/`HTTPS_PROXY` for https origins, `http_proxy`/`HTTP_PROXY` for http ones, and
`no_proxy`/`NO_PROXY`). Loopback origins go through the proxy too unless `no_proxy` lists them (as with
curl and requests); the instance metadata service (169.254.169.254) is always direct, since no proxy
can reach it on this host's behalf, and so is a managed identity endpoint on a loopback or link-local
address (App Service, Container Apps, Arc: `for_identity_endpoint`), whose secret header must not
cross the network. Trusted CAs never come from the environment: see `gateway.tls`.

The proxy's credentials (`user:password`) are a secret: never logged, never in an error, registered for
redaction in both their plain and their Basic-encoded form.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from gateway import redaction
from gateway.errors import ConfigError, ConnectError, ProxyRefused
from gateway.secrets import LiteralSecret, Secret

if TYPE_CHECKING:
    from gateway.config import EgressConfig

logger = logging.getLogger("gateway.egress")

IMDS_ADDRESS = "169.254.169.254"
# The proxy's answer to CONNECT is a status line and a few headers; anything longer is not a proxy.
MAX_CONNECT_ANSWER_BYTES = 16 * 1024
_DEFAULT_PROXY_PORT = 80  # as urllib3 and Go assume for an http:// proxy URL without a port

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


# ------------------------------------------------------------------------------------------ no_proxy
class NoProxy:
    """`no_proxy` entries: host names (which also cover their subdomains), domain suffixes (`.internal`,
    `*.internal`), IP addresses and CIDRs, or `*` for everything. Names are never resolved: an entry
    matches the host as written in the URL, as with curl."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.everything = False
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.entries: list[str] = []
        for entry in entries:
            self.add(entry)

    @staticmethod
    def check(entry: str) -> str:
        """The entry, normalised; ValueError saying what is wrong with it."""
        text = entry.strip().lower().rstrip(".")
        if text == "*":
            return text
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if not text:
            raise ValueError(f"{entry!r} is empty")
        if "/" in text:
            try:
                return str(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not a CIDR such as 10.0.0.0/8") from None
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        name = text[1:] if text.startswith("*.") else text
        labels = name.removeprefix(".").split(".")
        if not all(label and all(c.isalnum() or c in "-_" for c in label) for label in labels):
            raise ValueError(
                f"{entry!r} is not a host name, a domain suffix such as .internal, an IP address or a CIDR"
            )
        return name

    def add(self, entry: str) -> None:
        text = self.check(entry)
        self.entries.append(text)
        if text == "*":
            self.everything = True
        elif "/" in text:
            self.networks.append(ipaddress.ip_network(text))
        elif text.startswith("."):
            self.suffixes.append(text)
        else:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                self.names.add(text)
            else:
                self.networks.append(ipaddress.ip_network(address))

    def matches(self, host: str) -> bool:
        if self.everything:
            return True
        host = _normal_host(host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if host in self.names or any(host.endswith(suffix) for suffix in self.suffixes):
                return True
            # A name covers its subdomains: `example.com` matches `api.example.com` (curl, Go).
            parts = host.split(".")
            return any(".".join(parts[i:]) in self.names for i in range(1, len(parts)))
        return any(address in network for network in self.networks)

    def __bool__(self) -> bool:
        return bool(self.entries)


def _normal_host(host: str) -> str:
    host = host.lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _on_this_host_or_link(host: str) -> bool:
    """A loopback or link-local address, or `localhost` (RFC 6761): only this host, or its link, can
    reach it; a proxy elsewhere never could. `host` is normalised (`_normal_host`); names other than
    localhost are not resolved."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_link_local


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------------------------------------ the proxy
class Proxy:
    """One forward proxy: where it is (safe to log) and its credentials (never shown)."""

    def __init__(
        self, host: str, port: int, *, auth: Secret | None = None, source: str = "egress.proxy"
    ) -> None:
        self.host = host
        self.port = port
        self.address = _authority(host, port)  # what log lines and errors name
        self.url = f"http://{self.address}"
        self.source = source  # where the proxy was configured: egress.proxy or a variable's name
        self.auth = auth
        self._encoded_for: str | None = None
        self._encoded = ""

    def basic_credentials(self) -> str | None:
        """`Basic <base64(user:password)>`, re-encoded only when a rotated secret changed."""
        if self.auth is None:
            return None
        value = self.auth.value
        if value is not self._encoded_for:
            token = base64.b64encode(value.encode("utf-8")).decode("ascii")
            redaction.register(token)
            self._encoded = f"Basic {token}"
            self._encoded_for = value
        return self._encoded

    def authorization_line(self) -> bytes:
        """The `Proxy-Authorization` header line, or b"" without credentials."""
        credentials = self.basic_credentials()
        return b"" if credentials is None else b"Proxy-Authorization: " + credentials.encode() + b"\r\n"

    def __repr__(self) -> str:
        return f"Proxy({self.address}, auth={'yes' if self.auth is not None else 'no'})"

    __str__ = __repr__


def parse_proxy_url(url: str, where: str, *, environment: bool) -> Proxy:
    """An `http://host:port` proxy URL. From the environment, a scheme-less `host:port` is taken as
    http and `user:password@` as the credentials (as curl does); in the config file both are errors."""
    text = url.strip()
    if environment and "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    shown = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if _port(parts) else "")
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"{where}: the proxy must be an http://host:port URL (https and socks proxies are not "
            f"supported); got {shown if parts.hostname else 'no host'}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: the proxy URL must be http://host:port, without a path")
    port = _port(parts)
    if port is None:
        if not environment:
            raise ConfigError(f"{where}: the proxy URL needs a port, e.g. http://{parts.hostname}:3128")
        port = _DEFAULT_PROXY_PORT
    auth: Secret | None = None
    if parts.username is not None or parts.password is not None:
        if not environment:
            raise ConfigError(f"{where}: put the proxy's credentials in egress.proxy_auth, not in the URL")
        auth = LiteralSecret(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}")
    return Proxy(parts.hostname, port, auth=auth, source=where)


def _port(parts: Any) -> int | None:
    try:
        port: int | None = parts.port
    except ValueError:
        raise ConfigError("the proxy URL has an invalid port (1-65535)") from None
    return port


# ------------------------------------------------------------------------------------------ the policy
class Egress:
    """The proxy decision for every outbound connection of the process."""

    def __init__(
        self,
        *,
        https_proxy: Proxy | None = None,
        http_proxy: Proxy | None = None,
        no_proxy: NoProxy | None = None,
        local_direct: bool = False,
    ) -> None:
        self.https_proxy = https_proxy
        self.http_proxy = http_proxy
        self.no_proxy = no_proxy or NoProxy()
        self.local_direct = local_direct

    @classmethod
    def direct(cls) -> Egress:
        return cls()

    def for_identity_endpoint(self) -> Egress:
        """The policy for a managed identity endpoint: this one, except that loopback and link-local
        addresses (App Service's 127.0.0.1, Container Apps' localhost) are always reached directly.
        Through a proxy its `X-IDENTITY-HEADER` secret would cross the network in clear, to a proxy that
        could not reach this host's endpoint anyway."""
        return Egress(
            https_proxy=self.https_proxy,
            http_proxy=self.http_proxy,
            no_proxy=self.no_proxy,
            local_direct=True,
        )

    def proxy_for(self, scheme: str, host: str) -> Proxy | None:
        """The proxy a connection to `scheme://host` goes through, or None for a direct one."""
        proxy = self.https_proxy if scheme == "https" else self.http_proxy
        if proxy is None:
            return None
        host = _normal_host(host)
        if (
            host == IMDS_ADDRESS
            or (self.local_direct and _on_this_host_or_link(host))
            or self.no_proxy.matches(host)
        ):
            return None
        return proxy

    def authenticate(self, auth: Secret, where: str) -> None:
        """Use `auth` (`egress.proxy_auth`, user:password) with every proxy, in place of credentials an
        environment variable's URL may carry. Called once, before the first connection."""
        if ":" not in auth.value:
            raise ConfigError(f"{where}: must hold user:password ({auth.source})")
        for proxy in {id(p): p for p in (self.https_proxy, self.http_proxy) if p is not None}.values():
            proxy.auth = auth

    def proxy_for_url(self, url: str) -> Proxy | None:
        parts = urlsplit(url)
        return self.proxy_for(parts.scheme, parts.hostname or "")

    def describe(self, url: str) -> str:
        """How a connection to `url` leaves the gateway, for `gateway check` and the start-up log."""
        parts = urlsplit(url)
        host = _normal_host(parts.hostname or "")
        if host == IMDS_ADDRESS:
            return "direct (instance metadata service)"
        if self.local_direct and _on_this_host_or_link(host):
            return "direct (identity endpoint on this host)"
        proxy = self.proxy_for_url(url)
        if proxy is not None:
            return f"through the proxy {proxy.address}"
        configured = self.https_proxy if parts.scheme == "https" else self.http_proxy
        return "direct" if configured is None else "direct (no_proxy)"

    def __repr__(self) -> str:
        return (
            f"Egress(https={self.https_proxy and self.https_proxy.address}, "
            f"http={self.http_proxy and self.http_proxy.address}, no_proxy={self.no_proxy.entries})"
        )

    # ---------------------------------------------------------------- httpx clients
    def httpx_client(self, ssl_context: ssl.SSLContext, timeout: httpx.Timeout) -> httpx.Client:
        """THE factory for every blocking httpx client of the gateway (MSAL, managed identity): this
        TLS policy, this egress policy, nothing from the environment, no redirects."""
        return httpx.Client(
            transport=_SyncEgressTransport(self, ssl_context),
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
        )

    def httpx_async_client(self, ssl_context: ssl.SSLContext, timeout: httpx.Timeout) -> httpx.AsyncClient:
        """THE factory for every asyncio httpx client of the gateway (ARM, Key Vault)."""
        return httpx.AsyncClient(
            transport=_AsyncEgressTransport(self, ssl_context),
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
        )


def build_egress(config: EgressConfig, source: str, environ: Mapping[str, str] | None = None) -> Egress:
    """The policy from the `egress` section; unset keys fall back to the environment's variables.
    `egress.proxy_auth` is attached afterwards (`Egress.authenticate`): it may come from Key Vault, which
    is itself reached under this policy."""
    env = os.environ if environ is None else environ
    if config.proxy == "none":
        return Egress.direct()
    https_proxy: Proxy | None
    http_proxy: Proxy | None
    if config.proxy is not None:
        try:
            proxy = parse_proxy_url(config.proxy, "egress.proxy", environment=False)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        https_proxy = http_proxy = proxy
    else:
        https_proxy = _from_environment(env, "https_proxy")
        http_proxy = _from_environment(env, "http_proxy")
    if config.no_proxy is not None:
        no_proxy = NoProxy(config.no_proxy)
    else:
        no_proxy = NoProxy()
        name, value = _variable(env, "no_proxy")
        for entry in (value or "").split(","):
            if not entry.strip():
                continue
            try:
                no_proxy.add(_without_port(entry.strip()))
            except ValueError as exc:
                logger.warning("%s: ignoring the entry %s", name, exc)
    egress = Egress(https_proxy=https_proxy, http_proxy=http_proxy, no_proxy=no_proxy)
    for chosen, scheme in ((https_proxy, "https"), (http_proxy, "http")):
        if chosen is not None:
            logger.info(
                "egress: %s origins go through the proxy %s (from %s)%s",
                scheme,
                chosen.address,
                chosen.source,
                f", except no_proxy {','.join(no_proxy.entries)}" if no_proxy else "",
            )
    return egress


def _variable(env: Mapping[str, str], lower: str) -> tuple[str, str | None]:
    """curl's order: the lower-case name first, then the upper-case one; an empty value is unset."""
    for name in (lower, lower.upper()):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return lower.upper(), None


def _from_environment(env: Mapping[str, str], lower: str) -> Proxy | None:
    name, value = _variable(env, lower)
    if value is None:
        return None
    return parse_proxy_url(value, name, environment=True)


def _without_port(entry: str) -> str:
    """NO_PROXY entries may carry a port (`host:8080`); the gateway matches hosts only."""
    if entry.startswith("["):
        return entry.split("]", 1)[0] + "]"
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return entry


# ------------------------------------------------------------------------------------------ connections
class _OriginLike(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def proxy(self) -> Proxy | None: ...


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], _P],
    origin: _OriginLike,
    ssl_context: ssl.SSLContext | None,
    limit_s: float,
) -> tuple[asyncio.Transport, _P]:
    """A connection to `origin`: direct, to the proxy (http origins, which are then sent in absolute
    form), or through a CONNECT tunnel with TLS to the origin inside it. Everything, the CONNECT
    exchange included, happens within `limit_s`; after it, TimeoutError says which step was under way
    (the TCP connection, the proxy's answer to CONNECT, the TLS handshake). A proxy that cannot be
    reached raises ConnectError (cause `proxy_unreachable`), one that refuses the tunnel ProxyRefused,
    one that breaks the exchange ConnectError (cause `proxy_error`), all naming the proxy; OSError and
    ssl.SSLError from the origin's side are left to the caller."""
    proxy = origin.proxy
    target = _authority(origin.host, origin.port)
    step = f"the TCP connection to {target}"
    try:
        async with asyncio.timeout(limit_s):
            if proxy is None:
                if ssl_context is None:
                    return await loop.create_connection(protocol_factory, origin.host, origin.port)
                # TCP first, then TLS (as through a tunnel): a timeout can then say which one stalled.
                raw, holder = await loop.create_connection(_Holder, origin.host, origin.port)
            else:
                step = f"the TCP connection to the egress proxy {proxy.address}"
                try:
                    raw, tunnel = await loop.create_connection(
                        lambda: _Tunnel(proxy, target), proxy.host, proxy.port
                    )
                except OSError as exc:
                    raise ConnectError(
                        f"cannot connect to the egress proxy {proxy.address} (for {target}): "
                        f"{exc.strerror or exc}",
                        cause="proxy_unreachable",
                    ) from None
                holder = tunnel
                if ssl_context is None:
                    # An http origin: the proxy itself is the connection; requests go in absolute form.
                    protocol = protocol_factory()
                    holder.attach(raw, protocol)
                    return raw, protocol
                step = f"the egress proxy {proxy.address}'s answer to CONNECT {target}"
                try:
                    await tunnel.establish(raw)
                except BaseException:
                    raw.abort()
                    raise
            step = f"the TLS handshake with {target}"
            try:
                # The holder stays in place during the handshake: should it fail, the real protocol
                # never saw the connection (and never reports losing it).
                tls = await loop.start_tls(raw, holder, ssl_context, server_hostname=origin.host)
                if tls is None:
                    raise ConnectError(f"TLS with {target} could not start", cause="tls_handshake")
                protocol = protocol_factory()
                holder.attach(tls, protocol)
                return tls, protocol
            except BaseException:
                raw.abort()
                raise
    except TimeoutError:
        raise TimeoutError(step) from None


class _Holder(asyncio.Protocol):
    """The connection until the real protocol takes over after the TLS handshake (`attach`), keeping
    whatever arrives in between."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data

    def attach(self, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to the real protocol, with anything that arrived in between."""
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer and isinstance(protocol, asyncio.Protocol):
            data, self.buffer = bytes(self.buffer), bytearray()
            protocol.data_received(data)


class _Tunnel(_Holder):
    """The proxy connection until the real protocol takes over: the CONNECT exchange, then a relay for
    the TLS handshake, then out of the way (`attach`)."""

    def __init__(self, proxy: Proxy, target: str) -> None:
        super().__init__()
        self.proxy = proxy
        self.target = target
        self.answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.answer.done() and not self.answered:
            return  # the answer's head is complete or refused: the rest waits for `establish`
        self.buffer += data
        if self.answered:
            return  # bytes after the handshake, before attach: handed to the real protocol
        if b"\r\n\r\n" in self.buffer:
            self._settle(None)
        elif len(self.buffer) > MAX_CONNECT_ANSWER_BYTES:
            self._settle(
                ConnectError(
                    f"the egress proxy {self.proxy.address} answered CONNECT with more than "
                    f"{MAX_CONNECT_ANSWER_BYTES // 1024} KiB of headers",
                    cause="proxy_error",
                )
            )

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(
            ConnectError(
                f"the egress proxy {self.proxy.address} closed the connection before answering CONNECT "
                f"{self.target}",
                cause="proxy_error",
            )
        )

    def _settle(self, error: ConnectError | None) -> None:
        if self.answer.done():
            return
        if error is None:
            self.answer.set_result(None)
        else:
            self.answer.set_exception(error)

    async def establish(self, transport: asyncio.Transport) -> None:
        host_line = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % ((self.target.encode("idna"),) * 2)
        transport.write(host_line + self.proxy.authorization_line() + b"\r\n")
        await self.answer
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        self.answered = True
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, status_reason = status_line.partition(" ")
        status_text, _, reason = status_reason.partition(" ")
        if not version.startswith("HTTP/1.") or not (status_text.isdigit() and len(status_text) == 3):
            raise ConnectError(
                f"the egress proxy {self.proxy.address} answered CONNECT {self.target} with no HTTP status "
                f"line ({status_line[:60]!r})",
                cause="proxy_error",
            )
        status = int(status_text)
        if not 200 <= status < 300:
            # The reason phrase is the proxy's: for the operator's log, shortened (it never reaches a client).
            refusal = f"{status} {reason[:100]!r}" + _refusal_hint(status, self.proxy)
            raise ProxyRefused(refused(self.proxy, self.target, refusal), status=status)
        if self.buffer:
            raise ConnectError(
                f"the egress proxy {self.proxy.address} sent data before the TLS handshake to {self.target}",
                cause="proxy_error",
            )


def refused(proxy: Proxy, target: str, refusal: str) -> str:
    """The message for a refused tunnel: the proxy and its answer, never its credentials."""
    return f"the egress proxy {proxy.address} refused the tunnel to {target}: {refusal}"


def _refusal_hint(status: int, proxy: Proxy) -> str:
    if status == 407:
        return (
            " (the proxy wants credentials: set egress.proxy_auth)"
            if proxy.auth is None
            else " (the proxy refused egress.proxy_auth)"
        )
    if status == 403:
        return " (the proxy's policy forbids this destination)"
    if status == 502:
        return " (the proxy could not reach the upstream)"
    return ""


def absolute_form(head: bytes, prefix: bytes, proxy: Proxy) -> bytes:
    """A request head for an http origin through a proxy: `GET /p` becomes `GET http://host:port/p`,
    with the proxy's credentials after the request line."""
    target = head.index(b" ") + 1
    line_end = head.index(b"\r\n") + 2
    return head[:target] + prefix + head[target:line_end] + proxy.authorization_line() + head[line_end:]


# ------------------------------------------------------------------------------------------ httpx transports
class _Lease:
    """A transport to one proxy with one value of its credentials, and how many exchanges use it."""

    __slots__ = ("active", "retired", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.active = 0
        self.retired = False  # the credentials changed: closed once the last exchange ends


class _TransportCache:
    """One direct httpx transport, and per proxy one for the current value of its (rotating) credentials:
    when the value changes, the transport made with the old one is closed as soon as no exchange uses it,
    so rotated `proxy_auth` values leave no pool of open connections behind."""

    def __init__(self, egress: Egress, make: Callable[[httpx.Proxy | None], Any]) -> None:
        self.egress = egress
        self._make = make
        self._lock = threading.Lock()
        self.direct = make(None)
        self._proxied: dict[str, tuple[str | None, _Lease]] = {}  # proxy address -> (credentials, lease)
        self._retired: list[_Lease] = []

    def pick(self, url: httpx.URL) -> tuple[Any, Proxy | None, _Lease | None, list[Any]]:
        """(transport, proxy, lease to `end`, transports to close now) for one exchange with `url`."""
        proxy = self.egress.proxy_for(url.scheme, url.host)
        if proxy is None:
            return self.direct, None, None, []
        credentials = proxy.basic_credentials()
        with self._lock:
            held = self._proxied.get(proxy.address)
            if held is None or held[0] != credentials:
                if held is not None:
                    held[1].retired = True
                    self._retired.append(held[1])
                headers = {} if credentials is None else {"Proxy-Authorization": credentials}
                held = self._proxied[proxy.address] = (
                    credentials,
                    _Lease(self._make(httpx.Proxy(proxy.url, headers=headers))),
                )
            lease = held[1]
            lease.active += 1
            return lease.transport, proxy, lease, self._idle_retired()

    def end(self, lease: _Lease | None) -> list[Any]:
        """The exchange on `lease` is over; the transports to close now."""
        if lease is None:
            return []
        with self._lock:
            lease.active -= 1
            return self._idle_retired()

    def _idle_retired(self) -> list[Any]:
        idle = [lease for lease in self._retired if lease.active <= 0]
        self._retired = [lease for lease in self._retired if lease.active > 0]
        return [lease.transport for lease in idle]

    def all(self) -> list[Any]:
        with self._lock:
            leases = [lease for _, lease in self._proxied.values()] + self._retired
            self._retired = []
            return [self.direct, *(lease.transport for lease in leases)]


def _proxy_failure(exc: httpx.TransportError, proxy: Proxy, url: httpx.URL) -> httpx.TransportError:
    """The same kind of httpx error, naming the proxy (never its credentials)."""
    target = _authority(url.host, url.port or (443 if url.scheme == "https" else 80))
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ProxyError):
        message = refused(proxy, target, text)
        logger.warning("%s", message)
    else:
        message = f"through the egress proxy {proxy.address}: {text}"
    return type(exc)(message)


class _LeasedStream(httpx.SyncByteStream):
    """A response body that ends its lease when closed (the exchange lasts until the body is read)."""

    def __init__(self, stream: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._done()


class _AsyncLeasedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], Awaitable[None]]) -> None:
        self._stream = stream
        self._done = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            await self._done()


class _SyncEgressTransport(httpx.BaseTransport):
    def __init__(self, egress: Egress, ssl_context: ssl.SSLContext) -> None:
        self._cache = _TransportCache(
            egress, lambda proxy: httpx.HTTPTransport(verify=ssl_context, trust_env=False, proxy=proxy)
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        transport, proxy, lease, stale = self._cache.pick(request.url)
        self._close(stale)
        try:
            response: httpx.Response = transport.handle_request(request)
        except httpx.TransportError as exc:
            self._close(self._cache.end(lease))
            if proxy is None:
                raise
            raise _proxy_failure(exc, proxy, request.url) from None
        except BaseException:
            self._close(self._cache.end(lease))
            raise
        if lease is None:
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)
        stream = _LeasedStream(response.stream, lambda: self._close(self._cache.end(lease)))
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream, extensions=response.extensions
        )

    @staticmethod
    def _close(transports: list[Any]) -> None:
        for transport in transports:
            transport.close()

    def close(self) -> None:
        self._close(self._cache.all())


class _AsyncEgressTransport(httpx.AsyncBaseTransport):
    def __init__(self, egress: Egress, ssl_context: ssl.SSLContext) -> None:
        self._cache = _TransportCache(
            egress, lambda proxy: httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False, proxy=proxy)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport, proxy, lease, stale = self._cache.pick(request.url)
        await self._close(stale)
        try:
            response: httpx.Response = await transport.handle_async_request(request)
        except httpx.TransportError as exc:
            await self._close(self._cache.end(lease))
            if proxy is None:
                raise
            raise _proxy_failure(exc, proxy, request.url) from None
        except BaseException:
            await self._close(self._cache.end(lease))
            raise
        if lease is None:
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)

        async def done() -> None:
            await self._close(self._cache.end(lease))

        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_AsyncLeasedStream(response.stream, done),
            extensions=response.extensions,
        )

    @staticmethod
    async def _close(transports: list[Any]) -> None:
        for transport in transports:
            await transport.aclose()

    async def aclose(self) -> None:
        await self._close(self._cache.all())
