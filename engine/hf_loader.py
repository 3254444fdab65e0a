"""Read a Hugging Face model directory: config.json, safetensors weights (sharded or not) and,
when present, tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve.engine.files import load_hf_tokenizer
from pdserve.engine.model_config import DeepseekV3Config, LlamaConfig, config_from_hf
from pdserve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin files are "
                                "never loaded)")
    return files


def load_hf_config(path: Path) -> LlamaConfig | DeepseekV3Config:
    return config_from_hf(json.loads((path / "config.json").read_text()))


def load_hf_dir(
    path: Path, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[LlamaConfig | DeepseekV3Config, dict[str, torch.Tensor], Tokenizer | None,
           dict[str, Any]]:
    """Returns (config, state dict, tokenizer or None, the raw config.json)."""
    raw = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(raw)
    state: dict[str, torch.Tensor] = {}
    files = _weight_files(path)
    for f in tqdm(files, desc=f"loading {path.name}", unit="shard", disable=not progress,
                  leave=False):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if (key.startswith("model.layers.")
                        and int(key.split(".")[2]) >= cfg.num_hidden_layers):
                    continue  # e.g. DeepSeek-V3's multi-token-prediction layer
                t = st.get_tensor(key)
                # The router stays in float32, as in the reference implementation.
                keep32 = key.endswith(("gate.weight", "e_score_correction_bias")) and ".mlp." in key
                state[key] = t.float() if keep32 else t.to(dtype)
    return cfg, state, load_hf_tokenizer(path), raw
