"""Tokenizer, chat template and incremental detokenization.

Built with the `tokenizers` library from the vocabulary and merges a GGUF file carries
(byte-level BPE), so no hub download is ever needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Token names that end an assistant turn in common chat templates.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>")
_GGUF_CONTROL = 3  # llama.cpp token type: control (special) token


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_id: int | None,
    ) -> None:
        self._tok = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        stops = {eos_token_id} if eos_token_id is not None else set()
        for name in _END_OF_TURN:
            tid = backend.token_to_id(name)
            if tid is not None:
                stops.add(tid)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self._template = (
            jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            .from_string(chat_template)
            if chat_template
            else None
        )

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """Build from GGUF `tokenizer.ggml.*` metadata (byte-level BPE models)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only 'gpt2' BPE)")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
        backend.add_special_tokens(special)
        return cls(
            backend,
            chat_template=fields.get("tokenizer.chat_template"),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        if self._template is None:
            raise ValueError("this model has no chat template; send token ids instead")
        bos = self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self._tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        text = self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
        return self.encode(text)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE splits multi-byte characters across tokens; a delta that ends in an
    incomplete character (decodes to U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta
