"""Validation of public requests: every refusal is INVALID_ARGUMENT naming the field and the
limit. Pure: a request (and the model's limits) in, an `Admitted` request or an error out."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.tokenizer import Tokenizer
from pdserve.services.errors import InvalidArgument
from pdserve.services.limits import (
    MAX_REQUEST_ID,
    MAX_SALT,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKENS,
)
from pdserve.v1 import gateway_pb2

InvalidRequest = InvalidArgument


@dataclass(frozen=True)
class Admitted:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_token_ids: list[int]
    stop: list[str]
    min_tokens: int = 0


def admit(req: gateway_pb2.GenerateRequest, tokenizer: Tokenizer | None, vocab_size: int,
          max_context: int, max_prompt_tokens: int = 0, max_tokens_limit: int = 0) -> Admitted:
    """`max_prompt_tokens`, `max_tokens_limit`: the gateway's own limits (0 = none)."""
    has_ids = len(req.prompt_token_ids) > 0
    has_text = bool(req.prompt)
    has_msgs = len(req.messages) > 0
    given = sum((has_ids, has_text, has_msgs))
    if given == 0:
        raise InvalidRequest("prompt: empty; send exactly one of prompt, prompt_token_ids, "
                             "messages")
    if given > 1:
        raise InvalidRequest("prompt, prompt_token_ids, messages: send exactly one of them")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id: {len(req.request_id)} characters, limit "
                             f"{MAX_REQUEST_ID}")
    if len(req.cache_salt) > MAX_SALT:
        raise InvalidRequest(f"cache_salt: {len(req.cache_salt)} characters, limit {MAX_SALT}")
    if req.temperature < 0 or req.temperature != req.temperature:
        raise InvalidRequest(f"temperature: {req.temperature}, must be >= 0")
    given_max = req.HasField("max_tokens")
    if given_max and req.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens: {req.max_tokens}, must be > 0")
    if not 0 <= req.top_k <= vocab_size:
        raise InvalidRequest(f"top_k: {req.top_k}, must be in [0, {vocab_size}] (0 = no limit)")
    if not 0.0 <= req.top_p <= 1.0 or req.top_p != req.top_p:
        raise InvalidRequest(f"top_p: {req.top_p}, must be in (0, 1] (0 = no limit)")
    if len(req.stop_token_ids) > MAX_STOP_TOKENS:
        raise InvalidRequest(f"stop_token_ids: {len(req.stop_token_ids)} ids, limit "
                             f"{MAX_STOP_TOKENS}")
    bad = next((t for t in req.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"stop_token_ids: token id {bad} outside the vocabulary "
                             f"[0, {vocab_size})")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: {len(req.stop)} strings, limit {MAX_STOP_STRINGS}")
    for i, st in enumerate(req.stop):
        if not st or len(st) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{i}]: {len(st)} characters, must be 1..{MAX_STOP_CHARS}")
    if req.stop and tokenizer is None:
        raise InvalidRequest("stop: this server has no tokenizer; use stop_token_ids")
    if has_ids:
        prompt = list(req.prompt_token_ids)
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt_token_ids: token id {bad} outside the vocabulary [0, {vocab_size})")
    else:
        if tokenizer is None:
            raise InvalidRequest("prompt: this server has no tokenizer; send prompt_token_ids")
        if has_text:
            messages = [{"role": "user", "content": req.prompt}]
        else:
            messages = []
            for i, m in enumerate(req.messages):
                if m.role not in ("system", "user", "assistant"):
                    raise InvalidRequest(f"messages[{i}].role: {m.role!r}, must be system, "
                                         "user or assistant")
                messages.append({"role": m.role, "content": m.content})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if max_prompt_tokens and len(prompt) > max_prompt_tokens:
        raise InvalidRequest(f"prompt: {len(prompt)} tokens, limit --max-prompt-tokens "
                             f"{max_prompt_tokens}")
    max_tokens = req.max_tokens
    if not given_max:  # what the context leaves, within the gateway's limit
        max_tokens = max_context - len(prompt)
        if max_tokens_limit:
            max_tokens = min(max_tokens, max_tokens_limit)
        if max_tokens <= 0:
            raise InvalidRequest(f"prompt: {len(prompt)} tokens leave no room for an answer "
                                 f"in the context limit {max_context}")
    if max_tokens_limit and max_tokens > max_tokens_limit:
        raise InvalidRequest(f"max_tokens: {max_tokens}, limit --max-tokens-limit "
                             f"{max_tokens_limit}")
    if len(prompt) + max_tokens > max_context:
        raise InvalidRequest(
            f"max_tokens: prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
            f"{len(prompt) + max_tokens}, context limit {max_context}")
    if not 0 <= req.min_tokens <= max_tokens:
        raise InvalidRequest(f"min_tokens: {req.min_tokens}, must be in [0, max_tokens "
                             f"{max_tokens}]")
    return Admitted(prompt, max_tokens, float(req.temperature), req.top_k,
                    float(req.top_p) if 0.0 < req.top_p < 1.0 else 1.0,
                    list(req.stop_token_ids), list(req.stop), req.min_tokens)
