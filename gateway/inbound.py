"""Inbound protection: which clients may use the gateway's credentials at all."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import TYPE_CHECKING

from gateway.config import GatewayConfig, InboundConfig, is_loopback
from gateway.errors import ClientNotAllowed, ClientUnauthenticated

if TYPE_CHECKING:
    from gateway.exchange import Exchange


def inbound_problem(config: GatewayConfig) -> str | None:
    """Why `config` must not serve, or None: a listener other machines reach needs inbound protection
    (client networks, API keys or client certificates) unless the operator says the network is enough."""
    server = config.server
    if not server.tcp or is_loopback(server.host) or server.allow_unauthenticated_remote:
        return None
    if config.inbound.enabled or (server.tls is not None and server.tls.client_ca is not None):
        return None
    return (
        f"server.host is {server.host}, which is reachable from other machines, and no inbound protection "
        "is configured: anyone who can reach it could use this gateway's credentials. Configure "
        "`inbound.allow_cidrs` and/or `inbound.api_keys`, `server.tls.client_ca` (mutual TLS), bind "
        "127.0.0.1, or set `server.allow_unauthenticated_remote: true` if the network already restricts "
        "access"
    )


class InboundGuard:
    def __init__(self, config: InboundConfig) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in config.allow_cidrs]
        self.key_hashes = [(k.name, bytes.fromhex(k.sha256)) for k in config.api_keys]
        self.header = config.api_key_header.encode("latin-1")
        self._allowed_cache: dict[str, bool] = {}

    def check(self, exchange: Exchange) -> None:
        """Raise unless the client may proxy; strips the client's key so it never reaches the upstream."""
        if self.networks:
            client = exchange.client
            host = client[0] if client else ""
            allowed = self._allowed_cache.get(host)
            if allowed is None:
                allowed = self._in_networks(host)
                if len(self._allowed_cache) < 4096:
                    self._allowed_cache[host] = allowed
            if not allowed:
                raise ClientNotAllowed(
                    f"client address {host or 'unknown'} is not in inbound.allow_cidrs; ask the operator "
                    "to allow your network"
                )
        if self.key_hashes:
            presented: bytes | None = None
            kept = []
            for name, value in exchange.headers:
                if name == self.header:
                    presented = value
                else:
                    kept.append((name, value))
            exchange.headers = kept
            if presented is None or not self._key_matches(presented):
                raise ClientUnauthenticated(
                    f"send a valid gateway API key in the {self.header.decode()} header"
                )

    def _in_networks(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def _key_matches(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()
        matched = False
        for _, expected in self.key_hashes:
            # Compare against every stored hash so timing does not reveal which one matched.
            matched |= hmac.compare_digest(digest, expected)
        return matched
