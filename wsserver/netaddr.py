"""The client's address: from the socket, or from proxy headers we trust.

``X-Forwarded-For`` and ``X-Real-IP`` are plain request headers that any
client can set, so they are believed only when the socket peer is one of
``--trusted-proxies``. From a trusted peer, ``X-Forwarded-For`` is read from
the right: each hop appends the address it saw, so the rightmost address that
is not itself a trusted proxy is the real client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """Resolves the client address from the peer and proxy headers."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(net.strip(), strict=False) for net in networks
        )

    def is_trusted(self, address: str) -> bool:
        """True when ``address`` lies in one of the trusted networks."""
        ip = _parse_ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def client_address(
        self, peer: str, forwarded_for: str | None = None, real_ip: str | None = None
    ) -> str:
        """The address limits and logs should use for this request.

        Args:
            peer: the socket's remote address.
            forwarded_for: the ``X-Forwarded-For`` header, if any.
            real_ip: the ``X-Real-IP`` header, if any.
        """
        if not self.networks or not self.is_trusted(peer):
            return peer
        if forwarded_for:
            hops = [hop.strip() for hop in forwarded_for.split(",")]
            for hop in reversed(hops):
                ip = _parse_ip(hop)
                if ip is None:
                    # Garbage in the chain: stop at the last address we could trust.
                    break
                if not any(ip in net for net in self.networks):
                    return str(ip)
                peer = str(ip)
            return peer
        if real_ip:
            ip = _parse_ip(real_ip.strip())
            if ip is not None:
                return str(ip)
        return peer


def limit_key(address: str) -> str:
    """The key per-address limits count under: the address, or its /64 for IPv6.

    One IPv6 subscriber usually holds a whole /64, so counting single
    addresses would give each client billions of fresh handshake buckets and
    connection slots.
    """
    if ":" not in address:
        return address  # not IPv6 (the usual case: no parsing)
    ip = _parse_ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
