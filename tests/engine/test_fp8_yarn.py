"""DeepSeek-V3 checkpoints as they ship: FP8 e4m3 weights with 128x128 block scales (some
dimensions not multiples of 128), YaRN, a multi-token-prediction layer; against transformers
running the same weights dequantized by DeepSeek's formula (a float32 copy of the checkpoint:
transformers' own FP8 loading on CPU guesses the block size from the scale grid, see
shared/research/ep-tbo.md §4, so it is not the oracle); the refusals; and `model-info` on the
published full-size config."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.engine import cpu_kernels
from pdserve.engine.deepseek import MLAttention
from pdserve.engine.engine import LLMEngine
from pdserve.engine.fp8 import FP8, FP8Linear
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.model_config import config_from_hf
from pdserve.engine.model_info import model_info
from pdserve.engine.rope import RopeScaling, inv_freq, scaling_from_hf
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.random_models import YARN, make_deepseek_fp8, make_llama
from tests.helpers import agree_until_near_tie, assert_logits_follow

V3_CONFIG = Path(__file__).parent.parent / "data" / "deepseek_v3_config.json"


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3") / "fp8"
    ref, written = make_deepseek_fp8(path)
    return path, ref, written


@pytest.fixture(scope="module", params=["auto", "onednn"])
def ours(fp8_dir, request):
    """auto: decode steps' FP8 products in C where the kernels can be had; onednn: in torch."""
    m = load_model(fp8_dir[0], block_tokens=16, backend=request.param)
    in_c = {x.uses_kernel for x in m.model.modules() if isinstance(x, FP8Linear)}
    assert in_c == {m.backend.block_products}
    if request.param == "auto" and cpu_kernels.kernel() is not None:
        assert m.backend.name == "cpu-kernels" and in_c == {True}
    return m


def deepseek_formula(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """DeepSeek's weight_dequant, written out: element (i, j) times scale (i // 128, j // 128)."""
    rows = torch.arange(q.shape[0]) // 128
    cols = torch.arange(q.shape[1]) // 128
    return q.float() * s[rows][:, cols]


def test_dequantized_weights_equal_deepseeks_block_formula_bitwise(fp8_dir, ours):
    _, _, written = fp8_dir
    fp8_layers = {n: m for n, m in ours.model.named_modules() if isinstance(m, FP8Linear)}
    kv_b = {f"{n}.kv_b_proj": m.kv_b_proj for n, m in ours.model.named_modules()
            if hasattr(m, "kv_b_proj")}
    fp8_keys = {k.removesuffix(".weight") for k, v in written.items()
                if v.dtype == FP8 and not k.startswith("model.layers.3.")}  # 3: MTP, skipped
    assert set(fp8_layers) | set(kv_b) == fp8_keys
    odd = [n for n, m in fp8_layers.items() if m.out_features % 128 or m.in_features % 128]
    assert any("kv_a_proj_with_mqa" in n for n in odd) and any("q_a_proj" in n for n in odd)
    for name, m in fp8_layers.items():
        want = deepseek_formula(written[f"{name}.weight"], written[f"{name}.weight_scale_inv"])
        assert m.weight.dtype == FP8  # kept as one byte a weight
        assert torch.equal(m.dequantized(), want), name
        for r0, r1 in ((0, 128), (128, m.out_features)):  # tiles are the same numbers
            if r0 < m.out_features:
                assert torch.equal(m.dequantized(r0, r1), want[r0:r1]), name
    for name, lin in kv_b.items():  # absorbed MLA needs W_UK, W_UV: dequantized once at load
        want = deepseek_formula(written[f"{name}.weight"], written[f"{name}.weight_scale_inv"])
        assert torch.equal(lin.weight, want), name


def test_logits_match_transformers_for_prefill_and_each_decode_step_past_the_original_context(
        fp8_dir, ours):
    _, ref, _ = fp8_dir
    pool = KVPool(ours.layout, 24)
    runner = ModelRunner(ours.model, pool, prefill_chunk_tokens=19)  # odd chunks on purpose
    seq = torch.randint(0, 320, (41,), generator=torch.Generator().manual_seed(0)).tolist()
    pages = pool.reserve(pool.layout.pages_for(len(seq) + 40))
    # positions 41..76: past original_max_position_embeddings (64)
    seq = assert_logits_follow(ref, runner, seq, pages, 36)
    assert len(seq) > YARN["original_max_position_embeddings"]


def test_greedy_tokens_agree_for_32_steps_up_to_the_first_near_tie(fp8_dir, ours):
    _, ref, _ = fp8_dir
    prompt = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0, eos_token_id=None,
                           output_scores=True, return_dict_in_generate=True)
    expect = out.sequences[0, len(prompt):].tolist()
    gaps = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in out.scores]
    eng = LLMEngine(ModelRunner(ours.model, KVPool(ours.layout, 16)))
    got = eng.generate([prompt], SamplingParams(max_tokens=32))[0]
    n = agree_until_near_tie(got, expect, gaps)
    assert n >= 20, f"a near-tie at step {n} leaves too little compared"
    assert got[:n] == expect[:n]


def test_the_mtp_layer_is_skipped_and_anything_else_unknown_is_refused(fp8_dir, tmp_path):
    path, _, written = fp8_dir
    assert any(k.startswith("model.layers.3.") for k in written)  # in the file
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0  # now layer 3 is nothing pdserve knows
    bad = tmp_path / "no-mtp"
    shutil.copytree(path, bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.3\."):
        load_model(bad)


def _variant(src: Path, dst: Path, config: dict | None = None, drop: str | None = None,
             change: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if drop or change:
        state = load_file(str(dst / "model.safetensors"))
        if drop:
            del state[drop]
        state.update(change or {})
        save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("field, value, message", [
    ("quant_method", "awq", r"quantization_config\.quant_method 'awq'"),
    ("fmt", "e5m2", r"quantization_config\.fmt 'e5m2'"),
    ("activation_scheme", "static", r"quantization_config\.activation_scheme 'static'"),
    ("weight_block_size", [128], r"quantization_config\.weight_block_size"),
])
def test_unsupported_quantization_is_refused_naming_the_field(fp8_dir, tmp_path, field, value,
                                                              message):
    cfg = json.loads((fp8_dir[0] / "config.json").read_text())
    cfg["quantization_config"][field] = value
    with pytest.raises(ValueError, match=message):
        load_model(_variant(fp8_dir[0], tmp_path / "m", config=cfg))


def test_fp8_tensors_that_do_not_fit_are_refused_naming_the_tensor(fp8_dir, tmp_path):
    path, _, written = fp8_dir
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    with pytest.raises(ValueError, match=rf"{name}: an FP8 weight without its"):
        load_model(_variant(path, tmp_path / "a", drop=f"{name}_scale_inv"))
    with pytest.raises(ValueError, match=rf"{name}_scale_inv: shape \(1, 1\)"):
        load_model(_variant(path, tmp_path / "b", change={f"{name}_scale_inv": torch.ones(1, 1)}))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    with pytest.raises(ValueError, match="no FP8 quantization_config"):
        load_model(_variant(path, tmp_path / "c", config=cfg))
    head = written["lm_head.weight"].float()
    with pytest.raises(ValueError, match="lm_head.weight: FP8 weights are read for the decoder"):
        load_model(_variant(path, tmp_path / "d", change={
            "lm_head.weight": head.to(FP8), "lm_head.weight_scale_inv": torch.ones(3, 2)}))


# -- YaRN ---------------------------------------------------------------------------------------
V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_yarn_at_v3s_shape_equals_the_formula_and_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    s = scaling_from_hf({"rope_scaling": V3_YARN, "max_position_embeddings": 163840})
    ours = inv_freq(64, 10000.0, s)
    # DeepSeek's precompute_freqs_cis (inference/model.py), written out for dim 64.
    dim, base, factor = 64, 10000.0, 40

    def corr(n: float) -> float:
        return dim * math.log(4096 / (n * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    assert (low, high) == (10, 23)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    smooth = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low),
                             0, 1)
    deepseek = freqs / factor * (1 - smooth) + freqs * smooth
    torch.testing.assert_close(ours, deepseek, atol=1e-9, rtol=0)
    cfg = DeepseekV3Config(hidden_size=7168, num_attention_heads=128, qk_rope_head_dim=64,
                           qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=512,
                           q_lora_rank=1536, max_position_embeddings=163840,
                           rope_scaling=dict(V3_YARN), num_hidden_layers=1)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    assert torch.equal(ours, hf_inv) and s.cos_sin_factor == hf_factor == 1.0
    with torch.device("meta"):
        hf_scale = DeepseekV3Attention(cfg, layer_idx=0).scaling
    ours_scale = 192 ** -0.5 * s.softmax_mscale
    assert ours_scale == pytest.approx(hf_scale, rel=1e-12)
    assert ours_scale == pytest.approx(0.13523, abs=5e-6)
    v3 = config_from_hf(json.loads(V3_CONFIG.read_text()))
    with torch.device("meta"):
        assert MLAttention(v3, 0).scale == pytest.approx(0.13523, abs=5e-6)


# The checkpoints pdserve reads carry `rope_scaling` in config.json (DeepSeek V3's does), so the
# saved reference sets it too; transformers 5 warns that the key is deprecated.
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_llama_with_yarn_matches_transformers_past_the_original_context(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(11)
    cfg, _ = make_llama(tmp_path)
    cfg.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                        "rope_theta": 10000.0}
    cfg.rope_parameters = dict(cfg.rope_scaling)
    ref = LlamaForCausalLM(cfg).eval()
    assert ref.model.rotary_emb.attention_scaling != 1.0  # cos/sin are scaled
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, block_tokens=16)
    assert ours.config.rope_scaling.kind == "yarn"
    pool = KVPool(ours.layout, 16)
    runner = ModelRunner(ours.model, pool)
    seq = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    pages = pool.reserve(pool.layout.pages_for(len(seq) + 12))
    assert_logits_follow(ref, runner, seq, pages, 10)  # positions 30..39: past 32


@pytest.mark.parametrize("rope, message", [
    ({"type": "longrope", "factor": 4}, r"rope_scaling\.rope_type 'longrope' is not supported"),
    ({"type": "llama3", "factor": 8}, r"rope_scaling\.rope_type 'llama3'"),
    ({**V3_YARN, "short_factor": [1.0]}, r"rope_scaling\.short_factor is not part of the YaRN"),
    ({"type": "yarn", "factor": 4}, r"rope_scaling\.original_max_position_embeddings is required"),
    ({**V3_YARN, "partial_rotary_factor": 0.5}, r"rope_scaling\.partial_rotary_factor must be 1"),
])
def test_rope_variants_not_implemented_are_refused_naming_the_field(rope, message):
    with pytest.raises(ValueError, match=message):
        scaling_from_hf({"rope_scaling": rope})


def test_no_scaling_is_the_plain_rope():
    assert scaling_from_hf({}) == RopeScaling()
    assert torch.equal(inv_freq(64, 10000.0), 1.0 / (10000.0 ** (torch.arange(0, 64, 2) / 64)))


# -- sizing the full model ----------------------------------------------------------------------
def test_model_info_of_the_published_v3_config():
    raw = json.loads(V3_CONFIG.read_text())
    info = model_info(config_from_hf(raw), raw)
    assert info.params_total == pytest.approx(671e9, rel=0.005)
    assert info.params_activated == pytest.approx(37e9, rel=0.03)
    assert info.params_mtp == pytest.approx(14e9, rel=0.05)
    assert info.kv_bytes_per_token == 61 * 576 * 2 == 70_272
    assert info.params_per_expert == 3 * 7168 * 2048
    # FP8: one byte per linear weight plus a float32 per 128x128 block; the 1.85 B parameters
    # of the bf16 embeddings and head take two bytes each.
    assert 1.0 < info.weight_bytes / info.params_total < 1.01
    r = info.rank(ep_size=32, redundant_experts=32)  # DeepSeek's prefill deployment
    assert r.experts_per_rank == 9
    assert r.expert_bytes == 9 * 58 * info.expert_bytes
    assert r.weight_bytes == r.replicated_bytes + r.expert_bytes
    assert info.rank(144, 32).experts_per_rank == 2  # decode: 288 slots over 144 GPUs
    assert info.rank(1).weight_bytes == info.weight_bytes


def test_model_info_counts_what_the_whole_model_built_holds(fp8_dir):
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM

    raw = json.loads((fp8_dir[0] / "config.json").read_text())
    cfg = config_from_hf(raw)
    with torch.device("meta"):  # every expert built this time
        whole = sum(p.numel() for p in DeepseekV3ForCausalLM(cfg).parameters())
    info = model_info(cfg, raw)
    assert info.params_total == whole
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert info.params_activated == whole - info.moe_layers * (e - k) * info.params_per_expert


@pytest.mark.integration  # starts processes
def test_model_info_cli_prints_the_counts_and_json():
    cmd = [sys.executable, "-m", "pdserve", "model-info", str(V3_CONFIG), "--ep-size", "32,144",
           "--redundant-experts", "32"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "671.03 B total" in text and "37.55 B activated" in text
    assert "70,272 bytes per token" in text
    data = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True,
                                     timeout=120, check=True).stdout)
    assert [r["experts_per_rank"] for r in data["ranks"]] == [9, 2]
    bad = subprocess.run([sys.executable, "-m", "pdserve", "model-info", "/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "/nonexistent" in bad.stderr


def test_a_gguf_with_a_scaled_rope_is_refused_naming_the_field():
    from pdserve.engine.gguf_loader import config_from_fields

    with pytest.raises(ValueError, match=r"llama\.rope\.scaling\.type 'yarn'"):
        config_from_fields({"general.architecture": "llama", "llama.rope.scaling.type": "yarn"})


@pytest.mark.skipif(cpu_kernels.kernel() is None, reason="no C kernels on this machine")
def test_the_c_kernel_rebuilds_every_e4m3_value_bit_for_bit_and_multiplies_by_it():
    from pdserve.engine.fp8 import dequantize, quantize

    values = torch.arange(256, dtype=torch.uint8).view(FP8)
    values = values[~values.float().isnan()][:248].reshape(31, 8).contiguous()  # every number
    for w, s in ((values, torch.full((1, 1), 0.37)),
                 quantize(torch.randn(300, 264) * 0.1, (128, 128))):  # partial edge blocks
        want = dequantize(w, s, (128, 128))
        assert torch.equal(cpu_kernels.fp8_dequantize(w, s, (128, 128)), want)
        x = torch.randn(5, w.shape[1])
        torch.testing.assert_close(cpu_kernels.fp8_linear(x, w, s, (128, 128)), x @ want.T,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [False, True])
def test_gate_and_up_fused_into_one_product_hold_nothing_twice(kernel):
    from pdserve.engine.fp8 import FP8Product, quantize

    if kernel and cpu_kernels.kernel() is None:
        pytest.skip("no C kernels on this machine")
    layers = []
    for seed in (1, 2):
        lin = FP8Linear(200, 256, (128, 128))
        q, s = quantize(torch.randn(256, 200, generator=torch.Generator().manual_seed(seed)),
                        (128, 128))
        lin.weight.data, lin.weight_scale_inv.data = q, s
        lin.prepare(kernel)
        layers.append(lin)
    x = torch.randn(3, 200)
    alone = [lin(x, decode=True) for lin in layers]
    fused = FP8Product.fused(layers, kernel)
    assert fused is not None
    assert torch.equal(fused(x, decode=True), torch.cat(alone, dim=-1))
    storage = fused.weight.untyped_storage().data_ptr()
    assert all(lin.weight.untyped_storage().data_ptr() == storage for lin in layers)
    assert [torch.equal(lin(x, decode=True), a) for lin, a in zip(layers, alone)] == [True, True]
    odd = FP8Linear(200, 72, (128, 128))  # rows not whole blocks: not fused
    assert FP8Product.fused([layers[0], odd], kernel) is None
