"""The OpenAI API's bodies and their translation (services/gateway/openai_api.py), without a
server: requests to the gateway's, errors to OpenAI's bodies. Against a real server:
test_http_edge.py."""

from __future__ import annotations

import grpc
import pytest

from pdserve.services.errors import InvalidArgument, Status
from pdserve.services.gateway.openai_api import (
    ChatRequest,
    CompletionRequest,
    error_body,
    generate_request,
    usage,
)
from pdserve.v1 import gateway_pb2


def test_error_bodies_map_grpc_statuses_once():
    http, body, headers = error_body(Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "streams: 3",
                                            (("retry-after-ms", "1500"),)))
    assert (http, headers) == (429, {"retry-after-ms": "1500", "retry-after": "2"})
    assert body["error"]["param"] == "streams"
    http, body, _ = error_body(Status(grpc.StatusCode.INVALID_ARGUMENT,
                                      "max_tokens: prompt (9 tokens) + max_tokens (9000) = "
                                      "9009, context limit 8192"))
    assert http == 400 and body["error"]["code"] == "context_length_exceeded"
    for code, want in ((grpc.StatusCode.UNAUTHENTICATED, 401),
                       (grpc.StatusCode.PERMISSION_DENIED, 403),
                       (grpc.StatusCode.UNAVAILABLE, 503),
                       (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
                       (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.DATA_LOSS, 500)):
        assert error_body(Status(code, "no field here"))[0] == want
        assert error_body(Status(code, "no field here"))[1]["error"]["param"] is None


def test_chat_request_to_the_gateways():
    body = ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "seed": -1, "stop": "x", "top_k": 3,
        "ignore_eos": True, "min_tokens": 2, "vendor_field": {"ignored": True}})
    req = generate_request(body, None, "rid")
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"),
                                                           ("user", "ab")]
    assert req.max_tokens == 7  # max_completion_tokens wins
    assert req.HasField("seed") and req.seed == (1 << 64) - 1
    assert req.temperature == 1.0  # absent: OpenAI's default, not greedy
    assert list(req.stop) == ["x"] and req.top_k == 3 and req.ignore_eos and req.min_tokens == 2
    bare = generate_request(ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stop": None}),
        None, "r2")
    assert not bare.HasField("max_tokens") and not bare.HasField("seed")
    assert bare.temperature == 0.0 and list(bare.stop) == []


def test_completion_prompts():
    req = generate_request(CompletionRequest.model_validate({"prompt": [5, 6, 7]}), None, "r")
    assert list(req.prompt_token_ids) == [5, 6, 7] and not req.messages
    with pytest.raises(InvalidArgument, match="^prompt: 2 prompts"):
        generate_request(CompletionRequest.model_validate({"prompt": ["a", "b"]}), None, "r")
    with pytest.raises(InvalidArgument, match="^prompt: this server has no tokenizer"):
        generate_request(CompletionRequest.model_validate({"prompt": "text"}), None, "r")
    with pytest.raises(InvalidArgument, match="^echo"):
        generate_request(CompletionRequest.model_validate({"prompt": [1], "echo": True}), None,
                         "r")


def test_usage_always_carries_cached_tokens():
    u = usage(gateway_pb2.Usage(prompt_tokens=10, cached_tokens=0, completion_tokens=3))
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}
    assert (u["total_tokens"], u["prompt_cache_hit_tokens"], u["prompt_cache_miss_tokens"]) == \
        (13, 0, 10)
