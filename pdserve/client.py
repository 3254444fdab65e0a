"""A small synchronous client of the public API (used by `pdserve generate`, the demo, tests
and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

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


class Client:
    """`tls_ca`: PEM file of the CA that signed the gateway's certificate (TLS on); `token`: the
    tenant's bearer token (auth on). Neither belongs on a command line: `pdserve generate` reads
    them from files or PDSERVE_TOKEN."""

    def __init__(self, address: str, tls_ca: str | Path | None = None,
                 token: str | None = None) -> None:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
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
        res = Result()
        t0 = time.perf_counter()
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
