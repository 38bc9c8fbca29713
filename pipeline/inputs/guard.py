"""Which addresses a manifest URL may reach: never this machine, its network or the cloud's
metadata service (169.254.169.254) unless the user names the host in `[input] allow_hosts`.

A manifest is often someone else's list (a scraped dataset): a line pointing at
`http://169.254.169.254/latest/meta-data/...` or at an internal service would otherwise have its
bytes sent to the model and stored in a row. The check runs on the addresses a name resolves to
(`AddressGuard.resolver`, the only resolver of the image session, so the connection goes to the
very addresses that were checked: a DNS answer that changes between check and connect — DNS
rebinding — cannot slip through) and on every redirect hop (`check_url`; aiohttp connects to an
IP literal without asking the resolver, so literals are checked here).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from pipeline import locations

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
HINT = "set [input] allow_hosts to allow"


class RefusedAddress(OSError):
    """A URL whose host is, or resolves to, an address the fetcher must not reach. An OSError so
    that it crosses aiohttp's connector (which wraps a resolver's OSError) with its text."""


def address_kind(address: IPAddress) -> str | None:
    """Why `address` is not a public one ("link-local", ...), or None when it is. An
    IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # Order matters: Python counts all but multicast among is_private too (the most precise
    # name goes in the row).
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("unique-local", address in _UNIQUE_LOCAL),
        ("private", address.is_private),
        ("not a public address", not address.is_global),  # e.g. 100.64.0.0/10 (carrier NAT)
    )
    return next((kind for kind, hit in checks if hit), None)


def refusal(address: str) -> str | None:
    """The row's error for `address`, or None when it may be reached."""
    kind = address_kind(ipaddress.ip_address(address.split("%", 1)[0]))  # fe80::1%eth0
    if kind is None:
        return None
    return f"address {address} is {kind}: refused ({HINT})"


class AddressGuard:
    """The check of one fetcher: `allow_hosts` are names or addresses (as written in a URL, or
    as a name resolves) that are reached whatever their address."""

    def __init__(self, allow_hosts: tuple[str, ...] = ()) -> None:
        self.allowed = frozenset(_bare(host) for host in allow_hosts)

    def check_url(self, url: str, *, hop: int) -> None:
        """Raises RefusedAddress for a URL that must not be fetched: not http(s) after a
        redirect (`hop` > 0: a web server must not make the fetcher read `file:///etc/...`),
        or an IP literal host that is not public."""
        if not locations.is_http_url(url):
            scheme = locations.scheme_of(url) or "a relative"
            raise RefusedAddress(f"redirect to a {scheme}:// URL refused (hop {hop})")
        host = _bare(urlsplit(url).hostname or "")
        if host in self.allowed or not _is_literal(host):
            return  # a name: the resolver checks what it resolves to
        reason = refusal(host)
        if reason:
            raise RefusedAddress(reason)

    def resolver(self) -> AbstractResolver:
        return _GuardedResolver(self)

    def check_resolved(self, host: str, results: list[ResolveResult]) -> None:
        if _bare(host) in self.allowed:
            return
        for result in results:
            if result["host"] in self.allowed:
                continue
            reason = refusal(result["host"])
            if reason:
                raise RefusedAddress(f"host {host}: {reason}")


class _GuardedResolver(AbstractResolver):
    """getaddrinfo (aiohttp's threaded resolver), then the guard on every address: the
    connector only ever sees addresses that passed."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        self._guard.check_resolved(host, results)
        return results

    async def close(self) -> None:
        await self._inner.close()


def _bare(host: str) -> str:
    return host.strip().strip("[]").lower()


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
