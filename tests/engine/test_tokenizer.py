from __future__ import annotations

import pytest

from pdserve.engine.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world 12345",
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ünïcödé — “quotes” and emoji 🚆🚲 and 中文",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x**2  # comment",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, hf, text):
    _, ref = hf
    ids = tokenizer.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_chat_template_matches_transformers(tokenizer, hf):
    _, ref = hf
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name a color."}]):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True)
        if not isinstance(expected, list):
            expected = expected["input_ids"]
        assert tokenizer.apply_chat_template(messages) == expected


def test_stop_tokens_are_end_of_turn(tokenizer):
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.stop_token_ids
    assert tokenizer.eos_token_id in tokenizer.stop_token_ids


def test_incremental_detokenizer_holds_split_characters(tokenizer):
    text = "Zug 🚆 fährt"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([t]) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)
