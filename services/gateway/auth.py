"""Public API authentication (bearer tokens -> tenants) and per-client limits.

Tokens come from a JSON file (`--auth-tokens-file`) or the environment (`PDSERVE_AUTH_TOKENS`),
never from the command line:

    {"tokens": [{"token": "s3cret", "tenant": "acme"},
                {"token": "t0ken", "tenant": "beta", "kv_group": "shared", "admin": true}]}

A request's tenant comes from its `authorization: Bearer <token>` metadata; the tenant's
`kv_group` (default: the tenant itself) prefixes the request's cache salt, so tenants never share
KV blocks unless configured into one group. `admin` tenants may query every tenant's analytics.
Only SHA-256 digests of tokens are kept in memory, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pdserve.services.errors import Unauthenticated


class AuthError(ValueError):
    """A bad token table; the message names the setting."""


@dataclass(frozen=True)
class Tenant:
    tenant: str
    kv_group: str
    admin: bool = False

    def salt(self, cache_salt: str) -> str:
        """The cache salt the KV store sees: the tenant's group, then the request's own."""
        return f"{self.kv_group}\x00{cache_salt}"


class TokenTable:
    def __init__(self, entries: dict[bytes, Tenant]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        try:
            doc = json.loads(text)
            items = doc["tokens"]
            assert isinstance(items, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise AuthError(f"{source}: expected JSON {{\"tokens\": [{{\"token\": ..., "
                            "\"tenant\": ...}, ...]}") from None
        entries: dict[bytes, Tenant] = {}
        for i, it in enumerate(items):
            token, tenant = it.get("token"), it.get("tenant")
            if not isinstance(token, str) or len(token) < 16:
                raise AuthError(f"{source}: tokens[{i}].token must be a string of at least 16 "
                                "characters")
            if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
                raise AuthError(f"{source}: tokens[{i}].tenant must be 1..128 characters")
            digest = hashlib.sha256(token.encode()).digest()
            if digest in entries:
                raise AuthError(f"{source}: tokens[{i}]: the same token appears twice")
            entries[digest] = Tenant(tenant, str(it.get("kv_group") or tenant),
                                     bool(it.get("admin", False)))
        if not entries:
            raise AuthError(f"{source}: no tokens")
        return cls(entries)

    @classmethod
    def load(cls, path: Path | None, env_value: str | None) -> TokenTable | None:
        if path is not None and env_value:
            raise AuthError("--auth-tokens-file and PDSERVE_AUTH_TOKENS: set one of them")
        if path is not None:
            try:
                return cls.parse(Path(path).read_text(), f"--auth-tokens-file {path}")
            except OSError as e:
                raise AuthError(f"--auth-tokens-file: cannot read {path}: {e.strerror}") from None
        if env_value:
            return cls.parse(env_value, "PDSERVE_AUTH_TOKENS")
        return None

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant of a call's metadata; Unauthenticated naming what is wrong."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise Unauthenticated("authorization: missing; send 'authorization: Bearer <token>'")
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for d, t in self._entries.items():  # constant time per entry
            if hmac.compare_digest(d, digest):
                found = t
        if found is None:
            raise Unauthenticated("authorization: unknown token")
        return found


class ClientLimits:
    """Concurrent streams and request rate per client (tenant, or peer address without auth)."""

    def __init__(self, max_streams: int, rate_rps: float, burst: int) -> None:
        self.max_streams = max_streams
        self.rate = rate_rps
        self.burst = max(burst, 1)
        self._streams: dict[str, int] = defaultdict(int)
        self._bucket: dict[str, tuple[float, float]] = {}  # client -> (tokens, last time)

    def acquire(self, client: str, now: float | None = None) -> str | None:
        """Takes a stream slot and a rate token; returns a refusal message naming the limit, or
        None when admitted (then release() must follow)."""
        if self.rate > 0:
            now = time.monotonic() if now is None else now
            tokens, last = self._bucket.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                wait_ms = int((1.0 - tokens) / self.rate * 1000) + 1
                self._bucket[client] = (tokens, now)
                return (f"request rate: client {client!r} is over --rate-limit-rps {self.rate:g} "
                        f"(burst --rate-limit-burst {self.burst}); retry in {wait_ms} ms")
            self._bucket[client] = (tokens - 1.0, now)
        if self.max_streams and self._streams[client] >= self.max_streams:
            return (f"concurrent streams: client {client!r} has {self._streams[client]} running, "
                    f"limit --max-streams-per-client {self.max_streams}")
        self._streams[client] += 1
        return None

    def release(self, client: str) -> None:
        self._streams[client] -= 1
        if self._streams[client] <= 0:
            del self._streams[client]

    def running(self, client: str) -> int:
        return self._streams.get(client, 0)


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:51234' -> '10.0.0.7'; 'ipv6:[::1]:5' -> '::1'; others as they are."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer
