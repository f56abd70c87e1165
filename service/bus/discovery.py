"""Where the peers are: `tcp://host:port` as given, `dns://name:port` resolved by the node.

libzmq resolves a hostname itself, but synchronously in its I/O thread
(a dead DNS server stalls every socket of the context) and keeps only the
first address (a Kubernetes headless Service names every pod). So the bus
resolves names itself, off the event loop and within a timeout, and
connects once per address it gets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("service.bus")

# (host, port) -> the IP addresses it names now.
Resolver = Callable[[str, int], Awaitable[Iterable[str]]]


@dataclass(frozen=True, slots=True)
class PeerSpec:
    scheme: str  # "tcp" (connect as given) or "dns" (resolve, connect to each address)
    host: str
    port: int

    @property
    def text(self) -> str:
        return f"{self.scheme}://{_host_part(self.host)}:{self.port}"


class BadPeer(ValueError):
    pass


def parse_peer(value: str) -> PeerSpec:
    """`tcp://host:port` or `dns://name:port` (an IPv6 address in brackets)."""
    scheme, sep, rest = value.strip().partition("://")
    if not sep or scheme not in ("tcp", "dns"):
        raise BadPeer(f"{value!r}: a peer is tcp://host:port or dns://name:port")
    host, colon, port_text = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadPeer(
            f"{value!r}: give a host and a port from 1 to 65535, e.g. {scheme}://host:7400"
        )
    return PeerSpec(scheme, host, int(port_text))


def endpoint(host: str, port: int) -> str:
    """The ZeroMQ endpoint of an address (IPv6 in brackets)."""
    return f"tcp://{_host_part(host)}:{port}"


def _host_part(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def resolve_with_getaddrinfo(host: str, port: int) -> list[str]:
    """Every address `host` has now (the loop's getaddrinfo runs in a worker thread)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _name, address in infos:
        seen[str(address[0])] = None
    return list(seen)


async def resolve_endpoints(
    spec: PeerSpec, resolver: Resolver, timeout_s: float
) -> set[str] | None:
    """The endpoints `spec` names now; None when the lookup failed or timed out
    (the caller keeps what it had: a DNS hiccup must not disconnect a fleet)."""
    try:
        async with asyncio.timeout(timeout_s):
            addresses = await resolver(spec.host, spec.port)
    except TimeoutError:
        log.warning("bus: resolving %s took longer than %.1f s", spec.text, timeout_s)
        return None
    except OSError as exc:
        log.warning("bus: cannot resolve %s: %s", spec.text, exc)
        return None
    return {endpoint(_plain(a), spec.port) for a in addresses}


def _plain(address: str) -> str:
    # getaddrinfo may give a scoped IPv6 address (fe80::1%eth0); keep it as is.
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
