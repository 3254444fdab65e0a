"""Model hyper-parameters, named as in Hugging Face's `LlamaConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.layout import KVLayout


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def kv_layout(self, dtype: str, block_tokens: int) -> KVLayout:
        # GQA: K and V of every KV head side by side (DESIGN §3).
        kv_dim = 2 * self.num_key_value_heads * self.head_dim
        return KVLayout(self.num_hidden_layers, kv_dim, dtype, block_tokens)
