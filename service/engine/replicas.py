"""Which vLLM replica serves a user: rendezvous hashing with bounded load, as pure functions.

Every replica gets a score per key (`score`, a 64-bit BLAKE2b of replica and key); a key's
replicas in descending score order (`rendezvous_order`) are its preference list. The same key
therefore lands on the same replica from every gateway (adapter affinity: a user's adapter is
loaded where their requests go), a replica joining takes only the keys it now scores highest
for, and a replica leaving moves only its own keys.

Bounded load (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam 2018):
a replica may take a new request only while its load is below
`ceil(factor * (total load + 1) / replicas)`, so a hot user spills over to their next replica
(their adapter is then loaded on as many replicas as their traffic needs) while every replica
stays within `factor` of the average. Some replica is always below that bound.

Also the address helpers for discovery (`parse_host_port`, `replica_urls`). No I/O here:
`fedpersona.service.engine.replica_set` probes, resolves and sends.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_LOAD_FACTOR = 1.25


def score(key: str, replica: str) -> int:
    """The rendezvous weight of `replica` for `key` (stable across processes and versions)."""
    digest = hashlib.blake2b(f"{replica}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """`replicas` (deduplicated) by descending score for `key`, ties broken by name."""
    return sorted(set(replicas), key=lambda r: (-score(key, r), r))


def load_bound(total_load: int, replicas: int, factor: float = DEFAULT_LOAD_FACTOR) -> int:
    """The load a replica must stay below to take one more request."""
    if replicas < 1:
        raise ValueError("no replicas")
    if factor < 1:
        raise ValueError(f"load factor must be >= 1, got {factor}")
    return math.ceil(factor * (total_load + 1) / replicas)


def candidates(
    key: str,
    replicas: Sequence[str],
    *,
    load: Mapping[str, int],
    factor: float = DEFAULT_LOAD_FACTOR,
) -> list[str]:
    """The replicas to try for `key`, in order: first its highest-ranked replica whose load is
    below the bound, then the rest of its rendezvous order (for failover). Empty without
    replicas."""
    order = rendezvous_order(key, replicas)
    if not order:
        return []
    bound = load_bound(sum(max(0, load.get(r, 0)) for r in order), len(order), factor)
    # Exists: if every load were >= bound > total / n, the loads would sum to more than total.
    first = next(r for r in order if load.get(r, 0) < bound)
    return [first, *(r for r in order if r != first)]


def owner(key: str, replicas: Iterable[str]) -> str | None:
    """The replica `key` goes to when nothing is loaded (its affinity home)."""
    order = rendezvous_order(key, replicas)
    return order[0] if order else None


def parse_host_port(target: str) -> tuple[str, int]:
    """`host:port` (e.g. a headless Service's DNS name and vLLM's port) into its parts."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {target!r}")
    return host.strip("[]"), int(port)


def replica_urls(addresses: Iterable[str], port: int, *, scheme: str = "http") -> list[str]:
    """Base URLs of the replicas behind resolved `addresses`, sorted and deduplicated."""
    urls = set()
    for address in addresses:
        host = address
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            host = f"[{address}]"
        urls.add(f"{scheme}://{host}:{port}")
    return sorted(urls)
