"""A small synchronous client of the public API (used by `pdserve generate`, the demo, tests
and benchmarks)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdserve.config import parse_addresses
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass
class Result:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0       # measured by the client
    e2e_s: float = 0.0
    server_ttft_s: float = 0.0


# Calls spread over every address the target has (gRPC's round_robin). A Generate that fails
# UNAVAILABLE before its first token (its gateway died, drains, or has no worker yet) is sent
# again, up to RETRIES times, and round_robin gives it the next gateway; one that already
# streamed tokens is never retried: it fails UNAVAILABLE. (The retry is the client's own, not
# gRPC's retryPolicy: with grpcio 1.7x a server stream whose connection drops before its first
# message under a retryPolicy never ends, deadline included.)
SERVICE_CONFIG: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
RETRIES = 2
RETRY_BACKOFF_S = 0.1


def grpc_target(address: str) -> str:
    """A gRPC target for one gateway address or several (comma-separated): one host:port as
    is (a name gRPC resolves, every address of it in the rotation); several as the `ipv4:` /
    `ipv6:` list of all their addresses, names looked up now."""
    items = parse_addresses(address)
    if len(items) == 1:
        return address.strip()
    v4: list[str] = []
    v6: list[str] = []
    for host, port in items:
        for fam, *_, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            (v4 if fam == socket.AF_INET else v6).append(
                f"{sa[0]}:{port}" if fam == socket.AF_INET else f"[{sa[0]}]:{port}")
    v4, v6 = list(dict.fromkeys(v4)), list(dict.fromkeys(v6))
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


class Client:
    """`address`: a gateway's host:port, or several comma-separated (calls spread over them,
    and move on when one is down); `tls_ca`: PEM file of the CA that signed the gateways'
    certificate (TLS on); `token`: the tenant's bearer token (auth on). Neither belongs on a
    command line: `pdserve generate` reads them from files or PDSERVE_TOKEN."""

    def __init__(self, address: str, tls_ca: str | Path | None = None,
                 token: str | None = None) -> None:
        target = grpc_target(address)
        options = [("grpc.service_config", json.dumps(SERVICE_CONFIG))]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str | None = None,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        cache_salt: str = "",
        request_id: str = "",
        seed: int | None = None,  # None: derived from the request id
        top_k: int = 0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        timeout: float | None = 600,
        on_text: Callable[[str], None] | None = None,
    ) -> Result:
        req = gateway_pb2.GenerateRequest(
            prompt=prompt or "", prompt_token_ids=list(token_ids or []),
            messages=[gateway_pb2.ChatMessage(role=r, content=c) for r, c in (messages or [])],
            max_tokens=max_tokens, temperature=temperature, cache_salt=cache_salt,
            request_id=request_id, seed=seed, top_k=top_k, top_p=top_p, stop=list(stop),
            stop_token_ids=list(stop_token_ids), logprobs=logprobs, ignore_eos=ignore_eos,
            min_tokens=min_tokens)  # seed None: unset
        t0 = time.perf_counter()
        for attempt in range(RETRIES + 1):
            res = Result()
            try:
                return self._generate(req, res, t0, timeout, on_text)
            except grpc.RpcError as e:
                if (e.code() != grpc.StatusCode.UNAVAILABLE or res.token_ids
                        or attempt == RETRIES):
                    raise
            time.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise AssertionError("unreachable")

    def _generate(self, req: gateway_pb2.GenerateRequest, res: Result, t0: float,
                  timeout: float | None, on_text: Callable[[str], None] | None) -> Result:
        for msg in self.stub.Generate(req, timeout=timeout, metadata=self.metadata):
            if msg.token_ids and not res.token_ids:
                res.ttft_s = time.perf_counter() - t0
            res.request_id = msg.request_id or res.request_id
            res.token_ids.extend(msg.token_ids)
            res.logprobs.extend(msg.logprobs)
            res.text += msg.text
            if on_text and msg.text:
                on_text(msg.text)
            if msg.finish_reason:
                res.finish_reason = msg.finish_reason
                u = msg.usage
                res.prompt_tokens, res.cached_tokens = u.prompt_tokens, u.cached_tokens
                res.completion_tokens = u.completion_tokens
                res.server_ttft_s = msg.timing.ttft_s
        res.e2e_s = time.perf_counter() - t0
        return res

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(gateway_pb2.AbortRequest(request_id=request_id),
                               metadata=self.metadata).found
