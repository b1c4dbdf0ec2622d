"""One answer to "is this address loopback?", for the config, the guards and socket activation."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=1024)
def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 (in any spelling, e.g. ``0:0:0:0:0:0:0:1``) and
    IPv4-mapped loopback (``::ffff:127.0.0.1``); False for names and anything else.

    Cached: the guards ask it for the peer of every request.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
