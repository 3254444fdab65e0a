"""The OpenAI API's request and response bodies, and their translation to and from the
gateway's own request (research notes: shared/research/edge-and-scaleout.md part A).

What a request may carry is what clients send (the openai SDK, aiperf, guidellm): unknown fields
are ignored; what pdserve cannot do yet is refused with a 400 naming the field (`n` > 1,
`top_logprobs`, tools, images, `echo`)."""

from __future__ import annotations

import time
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field

from pdserve.engine.tokenizer import Tokenizer
from pdserve.services.errors import InvalidArgument, Status
from pdserve.v1 import gateway_pb2

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False


def generate_request(body: ChatRequest | CompletionRequest, tokenizer: Tokenizer | None,
                     request_id: str) -> gateway_pb2.GenerateRequest:
    """The gateway's request for an OpenAI one; InvalidArgument naming the field."""
    req = gateway_pb2.GenerateRequest(request_id=request_id)
    if body.n not in (None, 1):
        raise InvalidArgument(f"n: {body.n}; one choice per request (send n requests)")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens  # the newer name wins; neither: what the context leaves
    if limit is not None:
        name = "max_completion_tokens" if body.max_completion_tokens is not None else \
            "max_tokens"
        if limit <= 0:
            raise InvalidArgument(f"{name}: {limit}, must be > 0")
        req.max_tokens = limit
    req.temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    if body.top_p is not None:
        req.top_p = body.top_p
    if body.top_k is not None and body.top_k > 0:
        req.top_k = body.top_k
    if body.seed is not None:
        req.seed = body.seed % (1 << 64)  # a negative seed by two's complement
    if body.stop is not None:
        req.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.min_tokens:
        req.min_tokens = body.min_tokens
    req.ignore_eos = bool(body.ignore_eos)
    req.stop_token_ids.extend(body.stop_token_ids or [])
    if body.cache_salt:
        req.cache_salt = body.cache_salt
    if isinstance(body, ChatRequest):
        _chat(body, req)
    else:
        _completion(body, req, tokenizer)
    return req


def _chat(body: ChatRequest, req: gateway_pb2.GenerateRequest) -> None:
    if body.tools:
        raise InvalidArgument("tools: tool calls are not supported")
    if body.top_logprobs:
        raise InvalidArgument(f"top_logprobs: {body.top_logprobs}; only the chosen tokens' "
                              "log-probabilities are returned (0)")
    req.logprobs = bool(body.logprobs)
    for i, m in enumerate(body.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise InvalidArgument(f"messages[{i}].role: {m.role!r}, must be system, developer, "
                                  "user or assistant")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument(f"messages[{i}].content[{j}].type: "
                                          f"{part.get('type')!r}; only text parts")
                texts.append(part["text"])
            content = "".join(texts)
        else:
            content = m.content or ""
        req.messages.append(gateway_pb2.ChatMessage(role=role, content=content))


def _completion(body: CompletionRequest, req: gateway_pb2.GenerateRequest,
                tokenizer: Tokenizer | None) -> None:
    if body.echo:
        raise InvalidArgument("echo: not supported")
    if body.logprobs:
        raise InvalidArgument(f"logprobs: {body.logprobs}; top alternatives are not returned "
                              "(0 or null)")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidArgument(f"prompt: {len(prompt)} prompts; one per request")
        prompt = prompt[0]
    if isinstance(prompt, str):  # raw text, no chat template
        if tokenizer is None:
            raise InvalidArgument("prompt: this server has no tokenizer; send token ids")
        req.prompt_token_ids.extend(tokenizer.encode(prompt))
    else:
        req.prompt_token_ids.extend(prompt)


def usage(u: gateway_pb2.Usage) -> dict[str, Any]:
    """Usage as OpenAI (cached tokens always present, 0 included) and DeepSeek (hit and miss)
    name it; the same counts as the gRPC answer and the ledger row."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "prompt_cache_hit_tokens": u.cached_tokens,
            "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens}


class Reply:
    """The answer's pieces in OpenAI's shapes, for one request of `kind`."""

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str,
                 tokenizer: Tokenizer | None) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def logprobs(self, ids: list[int], values: list[float]) -> dict[str, Any] | None:
        if not values:
            return None
        out = []
        for tid, lp in zip(ids, values):
            token = self.tokenizer.decode([tid], skip_special_tokens=False) \
                if self.tokenizer else str(tid)
            out.append({"token": token, "logprob": lp, "bytes": list(token.encode()),
                        "top_logprobs": []})
        return {"content": out}

    def chunk(self, text: str | None, finish: str | None, role: bool = False,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, u: gateway_pb2.Usage) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(u)}

    def whole(self, text: str, finish: str, u: gateway_pb2.Usage,
              logprobs: dict[str, Any] | None) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [choice], "usage": usage(u)}


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


def error_body(status: Status) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI's error body, headers) for a gRPC status: mapped in this one
    place. The field a message names (its text up to the first ': ') is `param`."""
    http, kind = HTTP_STATUS.get(status.code, (500, "internal_error"))
    head, sep, _ = status.message.partition(": ")
    param = head if sep and " " not in head else None
    code: str | None = status.code.name.lower()
    if status.code == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in status.message:
        code = "context_length_exceeded"
    elif status.code == grpc.StatusCode.UNAUTHENTICATED:
        code = "invalid_api_key"
    headers = {}
    for key, value in status.metadata:
        if key == "retry-after-ms":
            headers["retry-after-ms"] = value
            headers["retry-after"] = str(max(1, -(-int(value) // 1000)))
    return http, {"error": {"message": status.message, "type": kind, "param": param,
                            "code": code}}, headers
