"""Read a Hugging Face model directory: config.json, safetensors weights (sharded or not) and,
when present, tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve.engine.files import load_hf_tokenizer
from pdserve.engine.fp8 import FP8, check_pair
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


def tensor_files(path: Path) -> dict[str, Path]:
    """Each tensor's name -> the safetensors file holding it (from the index when there is
    one, else by listing every file's keys)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def load_hf_config(path: Path) -> LlamaConfig | DeepseekV3Config:
    return config_from_hf(json.loads((path / "config.json").read_text()))


def load_hf_dir(
    path: Path, dtype: torch.dtype = torch.float32, progress: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> tuple[LlamaConfig | DeepseekV3Config, dict[str, torch.Tensor], Tokenizer | None,
           dict[str, Any]]:
    """Returns (config, state dict, tokenizer or None, the raw config.json). FP8 weights stay
    FP8, beside their float32 `_scale_inv` tensors (engine/fp8.py); the multi-token-prediction
    layers after the last (DeepSeek-V3's `num_nextn_predict_layers`) are skipped, and so is
    every tensor `skip` names (a rank of an EP group reads only its slots' experts). Anything
    else the model has no place for is left in the dict, for the loader to refuse."""
    raw = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(raw)
    block = cfg.fp8_block if isinstance(cfg, DeepseekV3Config) else None
    mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + (
        cfg.num_nextn_predict_layers if isinstance(cfg, DeepseekV3Config) else 0))
    state: dict[str, torch.Tensor] = {}
    skipped = 0
    files = _weight_files(path)
    for f in tqdm(files, desc=f"loading {path.name}", unit="shard", disable=not progress,
                  leave=False):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith("model.layers.") and int(key.split(".")[2]) in mtp:
                    skipped += 1  # multi-token prediction: not served (yet)
                    continue
                if skip is not None and skip(key):
                    continue
                t = st.get_tensor(key)
                if t.dtype == FP8 or key.endswith("_scale_inv"):
                    if block is None:
                        raise ValueError(f"{key}: an FP8 tensor (or its scales), but config.json "
                                         "has no FP8 quantization_config")
                    state[key] = t if t.dtype == FP8 else t.float()
                    continue
                # The router stays in float32, as in the reference implementation.
                keep32 = key.endswith(("gate.weight", "e_score_correction_bias")) and ".mlp." in key
                state[key] = t.float() if keep32 else t.to(dtype)
    if skipped:
        log.info("multi-token-prediction layers skipped", extra={
            "layers": list(mtp), "tensors": skipped})
    if block is not None:
        check_fp8(state, block)
    return cfg, state, load_hf_tokenizer(path), raw


def check_fp8(state: dict[str, torch.Tensor], block: tuple[int, int]) -> None:
    """Every FP8 weight has its scales of the right shape, and every scale its FP8 weight
    (ValueError naming the tensor)."""
    for key, t in state.items():
        if t.dtype == FP8:
            check_pair(key, t, state.get(key + "_scale_inv"), block)
        elif key.endswith("_scale_inv"):
            w = state.get(key.removesuffix("_scale_inv"))
            if w is None or w.dtype != FP8:
                raise ValueError(f"{key}: block scales for {key.removesuffix('_scale_inv')}, "
                                 "which is not an FP8 weight in this checkpoint")
