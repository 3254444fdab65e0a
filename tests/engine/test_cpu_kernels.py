"""The CPU decode kernels (engine/cpu_kernels.py, engine/csrc/cpu_kernels.c) against torch and
gguf-py: GGUF blocks rebuilt bit for bit, products and attention within float32 rounding, every
row's result independent of the batch, and the fused decode layer equal to the torch layer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from pdserve.engine import cpu_kernels
from pdserve.engine.attention import AttnBatch
from pdserve.engine.cpu_kernels import DecodePlan, QuantWeight

# This machine (and CI's) has a C compiler and an AVX2 CPU: the kernels must be there, or
# the speed the README reports is not what runs. Fail loudly rather than skip.
KERNEL = cpu_kernels.kernel()


def test_kernels_are_built_here():
    assert KERNEL is not None, cpu_kernels.why_not()
    assert KERNEL.path.exists() and KERNEL.path.parent == cpu_kernels.kernel_dir()


def quantized(kind: str, n: int, k: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """Random weights quantized by gguf-py, and gguf-py's own float32 rebuild of them."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    blocks = gguf.quants.quantize(w, QT[kind])
    ref = gguf.quants.dequantize(blocks, QT[kind]).astype(np.float32)
    return QuantWeight.from_gguf(kind, blocks, (n, k)), torch.from_numpy(ref.reshape(n, k))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_rebuilt_weights_are_gguf_py_bit_for_bit(kind):
    qw, ref = quantized(kind, 37, 256, seed=1)
    got = cpu_kernels.dequantize(qw)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def test_the_real_model_s_blocks_rebuild_bit_for_bit():
    from pdserve.engine.loader import default_model_path

    reader = gguf.GGUFReader(str(default_model_path()))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in cpu_kernels.KINDS and t.tensor_type.name not in seen:
            seen.add(t.tensor_type.name)
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            qw = QuantWeight.from_gguf(t.tensor_type.name, t.data, ref.shape)
            assert np.array_equal(cpu_kernels.dequantize(qw).numpy().view(np.int32),
                                  ref.view(np.int32)), t.name
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 64, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_f_linear_on_the_rebuilt_weights(kind, rows, bias):
    qw, w = quantized(kind, 43, 192, seed=rows)  # 43 rows: a group of 4 with a tail
    b = torch.randn(43) if bias else None
    x = torch.randn(rows, 192)
    torch.testing.assert_close(cpu_kernels.qlinear(x, qw, b), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize(("n", "bias"), [(96, False), (43, True)])
def test_a_row_s_product_does_not_depend_on_the_batch(kind, n, bias):
    """Bit for bit, whatever the batch: a lone row (batch-1 decode, whose weights are rebuilt
    in registers, never stored) and the same row in batches of 6 and 17 (rebuilt into a
    buffer); 43 rows end in a group of one, with a bias."""
    qw, _ = quantized(kind, n, 576, seed=3)
    b = torch.randn(n) if bias else None
    x = torch.randn(17, 576)
    whole = cpu_kernels.qlinear(x, qw, b)
    for i in (0, 5, 16):
        assert torch.equal(cpu_kernels.qlinear(x[i:i + 1], qw, b)[0], whole[i])
    assert torch.equal(cpu_kernels.qlinear(x[3:9], qw, b), whole[3:9])


def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 e4m3 weight [n, k] (bytes) with 8 x 8 block scales."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn).view(torch.uint8)
    return w.contiguous(), torch.rand((n + 7) // 8, k // 8, generator=g) + 0.5


@pytest.mark.parametrize("k", [576, 200])  # 200: a row that ends 8 past a multiple of 16
def test_an_fp8_row_s_product_does_not_depend_on_the_batch(k):
    w, s = fp8_weight(43, k, seed=k)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(k))
    whole = cpu_kernels.fp8_linear(x, w, s, (8, 8))
    for i in range(9):
        assert torch.equal(cpu_kernels.fp8_linear(x[i:i + 1], w, s, (8, 8))[0], whole[i])
    deq = cpu_kernels.fp8_dequantize(w, s, (8, 8))
    ref = F.linear(x.double(), deq.double())
    # float32 sums in another order than the reference's: the error scales with the terms'
    # magnitudes (an output near 0 may be a sum of terms of ~100), not with the output's.
    terms = F.linear(x.abs().double(), deq.abs().double())
    assert ((whole.double() - ref).abs() <= 1e-6 * terms).all()


def _products_digest() -> str:
    """(Run in a child process.) xxh3 of products over both GGUF kinds (batch 1, 4 and 5, a
    tail group of one row of W) and FP8 (batch 1 and 5, a row 8 past a multiple of 16), and of
    decode attention over a float32 and a float16 pool."""
    import xxhash

    h = xxhash.xxh3_64()
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(7))
    for kind in ("Q4_1", "Q8_0"):
        qw, _ = quantized(kind, 43, 576, seed=7)
        for rows in (x[:1], x[1:2], x[:4], x):
            h.update(cpu_kernels.qlinear(rows, qw).numpy().tobytes())
    w, s = fp8_weight(43, 200, seed=7)
    for rows in (x[:1, :200], x[:, :200]):
        h.update(cpu_kernels.fp8_linear(rows.contiguous(), w, s, (8, 8)).numpy().tobytes())
    # decode attention: groups of 3 query heads (one chunk of the wide kernel) and of 4 (a
    # chunk and a rest), heads of 64 and of 40 dims (a partial 32-lane block), short and
    # ragged contexts
    g = torch.Generator().manual_seed(7)
    ctx_lens = [5, 16, 33, 70]
    firsts = [0, 1, 2, 5]
    tables = [torch.arange(f, f + -(-c // 16)) for f, c in zip(firsts, ctx_lens)]
    for heads, n_kv, hd in ((9, 3, 64), (8, 2, 40)):
        kv = torch.randn(12, 2, 16, 2 * n_kv * hd, generator=g)
        q = torch.randn(4, heads, hd, generator=g)
        for pool in (kv, kv.half()):  # a float32 and a float16 pool
            out = torch.zeros_like(q)
            cpu_kernels.decode_attention(q, pool, 1, n_kv,
                                         DecodePlan.build(range(4), ctx_lens, tables), 0.125, out)
            h.update(out.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.integration
def test_the_wide_and_the_plain_kernels_give_the_same_bits():
    """Products and attention run with AVX-512 where the CPU has it, else with AVX2
    (PDSERVE_NO_AVX512=1 forces that): the same chains, so the same bits, at batch 1 (weights
    rebuilt in registers) and above (rebuilt into a buffer), and attention's several query heads
    at once. Each in a fresh process (the choice is made once per
    process)."""
    code = ("import sys; sys.path.insert(0, '.'); "
            "from tests.engine.test_cpu_kernels import _products_digest as f; print(f())")
    runs = {}
    for wide in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "PDSERVE_NO_AVX512"}
        if wide == "0":
            env["PDSERVE_NO_AVX512"] = "1"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[wide] = r.stdout.split()[-1]
    assert runs["0"] == runs["1"]


def test_bad_arguments_are_refused():
    qw, _ = quantized("Q8_0", 8, 64, seed=4)
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu_kernels.qlinear(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="bias"):
        cpu_kernels.qlinear(torch.randn(2, 64), qw, torch.zeros(7))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantWeight("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), (2, 48))
    with pytest.raises(ValueError, match="unsupported quantization"):
        QuantWeight("Q5_K", torch.zeros(2, 34, dtype=torch.uint8), (2, 32))
    assert QuantWeight.cat([qw, None]) is None
    other, _ = quantized("Q4_1", 8, 64, seed=5)
    assert QuantWeight.cat([qw, other]) is None  # kinds differ: no fused blocks
    both = QuantWeight.cat([qw, qw])
    assert both is not None and both.shape == (16, 64)


def reference_attention(q, kv, layer, n_kv, tables, ctx_lens, scale):
    hd = q.shape[-1]
    half = n_kv * hd
    out = []
    for i, (table, ctx) in enumerate(zip(tables, ctx_lens)):
        rows = kv[table, layer].reshape(-1, 2 * half)[:ctx]
        k = rows[:, :half].view(ctx, n_kv, hd).transpose(0, 1)
        v = rows[:, half:].view(ctx, n_kv, hd).transpose(0, 1)
        qi = q[i].view(n_kv, -1, hd)
        out.append(F.scaled_dot_product_attention(qi, k, v, scale=scale).reshape(-1, hd))
    return torch.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa_over_scattered_pages(threads):
    torch.manual_seed(0)
    pages, layers, bt, n_kv, heads, hd = 40, 3, 16, 2, 6, 32
    kv = torch.randn(pages, layers, bt, 2 * n_kv * hd)
    ctx_lens = [1, 7, 16, 17, 50, 64]
    perm = torch.randperm(pages).tolist()
    tables, at = [], 0
    for ctx in ctx_lens:
        n = -(-ctx // bt)
        tables.append(torch.tensor(perm[at:at + n]))
        at += n
    q = torch.randn(len(ctx_lens), heads, hd)
    plan = DecodePlan.build(range(len(ctx_lens)), ctx_lens, tables)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layer in range(layers):
            out = torch.full_like(q, float("nan"))
            cpu_kernels.decode_attention(q, kv, layer, n_kv, plan, 0.17, out)
            ref = reference_attention(q, kv, layer, n_kv, tables, ctx_lens, 0.17)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            # one sequence alone gets the same bits as in the batch (and fewer sequences than
            # threads take the per-KV-head split)
            for i in (1, 4):
                alone = torch.zeros(1, heads, hd)
                cpu_kernels.decode_attention(q[i:i + 1], kv, layer, n_kv,
                                             DecodePlan.build([0], [ctx_lens[i]], [tables[i]]),
                                             0.17, alone)
                assert torch.equal(alone[0], out[i])
    finally:
        torch.set_num_threads(before)


def test_decode_attention_reads_a_float16_pool_as_its_float32_values():
    """A float16 pool: the same bits as a float32 pool holding the same values (widened as
    read, then the same chains); a bfloat16 pool is refused."""
    torch.manual_seed(2)
    pages, layers, bt, n_kv, heads, hd = 12, 2, 16, 2, 6, 32
    kv16 = torch.randn(pages, layers, bt, 2 * n_kv * hd).half()
    ctx_lens, tables = [5, 16, 40], [torch.tensor([3]), torch.tensor([7]),
                                     torch.tensor([0, 11, 4])]
    q = torch.randn(3, heads, hd)
    plan = DecodePlan.build(range(3), ctx_lens, tables)
    for layer in range(layers):
        half_, full = torch.empty_like(q), torch.empty_like(q)
        cpu_kernels.decode_attention(q, kv16, layer, n_kv, plan, 0.2, half_)
        cpu_kernels.decode_attention(q, kv16.float(), layer, n_kv, plan, 0.2, full)
        assert torch.equal(half_, full)
        ref = reference_attention(q, kv16.float(), layer, n_kv, tables, ctx_lens, 0.2)
        torch.testing.assert_close(half_, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="float32 or float16"):
        cpu_kernels.decode_attention(q, kv16.bfloat16(), 0, n_kv, plan, 0.2, torch.empty_like(q))


def test_decode_attention_refuses_a_table_too_short():
    kv = torch.randn(4, 1, 8, 2 * 8)
    plan = DecodePlan.build([0], [9], [torch.tensor([1])])  # 9 tokens need 2 pages of 8
    with pytest.raises(ValueError, match="refused"):
        cpu_kernels.decode_attention(torch.randn(1, 2, 8), kv, 0, 1, plan, 1.0,
                                     torch.empty(1, 2, 8))
    out = torch.zeros(1, 2, 8)  # no sequence: nothing written, no error
    cpu_kernels.decode_attention(torch.randn(1, 2, 8), kv, 0, 1, DecodePlan.build([], [], []),
                                 1.0, out)
    assert not out.any()


@pytest.fixture(scope="module")
def loaded():
    from pdserve.engine.loader import load_model

    return load_model()


def test_the_default_model_decodes_from_its_blocks(loaded):
    m = loaded.model
    layer = m.model.layers[0]
    qkv = layer.self_attn.qkv_product
    assert qkv.quant is not None and qkv.quant.kind == "Q4_1"
    assert layer.mlp.down_product.quant is not None and m.head_product.quant.kind == "Q8_0"
    assert m.fused_decode is not None
    # The blocks are the float32 weights, bit for bit (q and k rows un-permuted alike).
    for lin, w in ((qkv, qkv.weight), (layer.mlp.gate_up_product, layer.mlp.gate_up_product.weight),
                   (m.head_product, m.lm_head.weight)):
        assert torch.equal(cpu_kernels.dequantize(lin.quant).view(torch.int32),
                           w.contiguous().view(torch.int32))


def decode_logits(model, kv, ctx_lens, tables, tokens, bt):
    batch = AttnBatch.build([1] * len(ctx_lens), ctx_lens, tables, bt, decode_step=True)
    return model(torch.tensor(tokens), kv, batch)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_the_fused_decode_layer_equals_the_torch_layers(loaded, monkeypatch, kv_dtype):
    """Three sequences with their prompts' KV in the pool: one decode step through the fused
    C layers and through the torch layers (same products from blocks) give the same logits and
    write the same K/V (a float16 pool: both round the new K/V to nearest even)."""
    from dataclasses import replace

    model, layout = loaded.model, replace(loaded.layout, dtype=kv_dtype)
    bt = layout.block_tokens
    torch.manual_seed(1)
    from pdserve.engine.kv_pool import KVPool

    pool = KVPool(layout, 12)
    prompts = [torch.randint(100, 40000, (n,)).tolist() for n in (5, 70, 130)]
    tables = [[1], [2, 3], [4, 5, 6]]
    for p, t in zip(prompts, tables):
        model(torch.tensor(p), pool.kv, AttnBatch.build([len(p)], [len(p)], [t], bt))
    ctx = [len(p) + 1 for p in prompts]
    tables = [[1], [2, 3], [4, 5, 6, 7]]  # the third one's new token starts a page
    kv_a = pool.kv.clone()
    fused = decode_logits(model, kv_a, ctx, tables, [11, 22, 33], bt)
    monkeypatch.setattr(model, "fused_decode", None)
    kv_b = pool.kv.clone()
    plain = decode_logits(model, kv_b, ctx, tables, [11, 22, 33], bt)
    # float16: a new K/V value rounded one half ulp apart moves a logit by up to ~3e-4
    tol = 1e-4 if kv_dtype == "float32" else 1e-3
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    if kv_dtype == "float32":
        torch.testing.assert_close(kv_a, kv_b, rtol=1e-5, atol=1e-5)
    else:  # the K/V before rounding differ as the float32 ones do (1e-5); rounded, within
        # two halves' ulps
        torch.testing.assert_close(kv_a.float(), kv_b.float(), rtol=1e-3, atol=2e-4)
    assert not torch.equal(kv_a, pool.kv)  # the new tokens' K/V were written
    # batch invariance of the fused step: the middle sequence alone, same bits
    monkeypatch.undo()
    alone = decode_logits(model, pool.kv.clone(), [ctx[1]], [tables[1]], [22], bt)
    assert torch.equal(alone[0], fused[1])


def test_the_layer_timers_time_every_part_and_change_no_bit(loaded):
    """bench/step_profile.py's timers: on, a decode step's parts add up to no more than the
    step, the products and the attention take time; off, nothing is counted; the logits are
    the same bits either way."""
    model, layout = loaded.model, loaded.layout
    from pdserve.engine.kv_pool import KVPool

    pool = KVPool(layout, 4)
    bt = layout.block_tokens
    prompt = torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    model(torch.tensor(prompt), pool.kv, AttnBatch.build([len(prompt)], [len(prompt)], [[1]], bt))

    def step() -> torch.Tensor:
        return decode_logits(model, pool.kv.clone(), [21], [[1]], [7], bt)

    cpu_kernels.layer_timers(False)  # zeroed
    off = step()
    assert sum(cpu_kernels.layer_timers(True).values()) == 0.0
    t0 = time.perf_counter()
    on = step()
    wall = time.perf_counter() - t0
    parts = cpu_kernels.layer_timers(False)
    assert list(parts) == list(cpu_kernels.LAYER_PARTS)
    assert all(v >= 0 for v in parts.values()) and 0 < sum(parts.values()) <= wall
    for name in ("q/k/v product", "attention", "output product", "gate/up product",
                 "down product"):
        assert parts[name] > 0, name
    assert torch.equal(on, off)
    step()
    assert sum(cpu_kernels.layer_timers(False).values()) == 0.0


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.mark.integration
def test_without_a_compiler_the_model_runs_its_float32_weights(tmp_path):
    """A fresh kernel directory and no compiler: the kernels are not had, one warning says why,
    and the model still loads and decodes (float32 weights, torch layers)."""
    code = (
        "from pdserve.engine import cpu_kernels\n"
        "from pdserve.engine.loader import load_model\n"
        "assert cpu_kernels.kernel() is None\n"
        "print('why:', cpu_kernels.why_not())\n"
        "m = load_model().model\n"
        "assert m.fused_decode is None and m.head_product.quant is None\n"
        "print('loaded')\n")
    r = run_python(code, CC="/nonexistent/cc", PDSERVE_KERNEL_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "no C compiler '/nonexistent/cc'" in r.stdout and "loaded" in r.stdout
    # Asking for the kernels by name when they cannot be had is a start-up error naming why.
    r = run_python("from pdserve.engine.loader import load_model\n"
                   "load_model(backend='cpu-fused')\n",
                   CC="/nonexistent/cc", PDSERVE_KERNEL_DIR=str(tmp_path))
    assert r.returncode != 0 and "--backend cpu-fused" in r.stderr
    assert "no C compiler" in r.stderr


_BY_BACKEND: dict[str, object] = {}


def loaded_on(backend: str):
    """The default model on a backend, loaded once for the module."""
    from pdserve.engine.loader import load_model

    if backend not in _BY_BACKEND:
        _BY_BACKEND[backend] = load_model(backend=backend)
    return _BY_BACKEND[backend]


def one_decode_step(m) -> torch.Tensor:
    from pdserve.engine.kv_pool import KVPool

    pool = KVPool(m.layout, 4)
    prompt = list(range(300, 340))
    m.model(torch.tensor(prompt), pool.kv, AttnBatch.build([40], [40], [[0]], 64))
    return decode_logits(m.model, pool.kv, [41], [[0]], [7], 64)


@pytest.mark.parametrize("backend, blocks, c_attention, fused", [
    ("torch", False, False, False), ("onednn", False, False, False),
    ("cpu-kernels", True, True, False), ("cpu-fused", True, True, True)])
def test_each_backend_runs_what_it_names(backend, blocks, c_attention, fused):
    """The backend is chosen once at load, by name: which products read blocks, which
    attention runs, whether a layer is one C call; the logits agree across all of them."""
    m = loaded_on(backend)
    assert m.backend.name == backend
    layer = m.model.decoder_layers()[0]
    assert (layer.self_attn.qkv_product.quant is not None) is blocks
    assert (layer.mlp.down_product.packed is not None) is (backend != "torch")
    assert layer.self_attn.c_attention is c_attention
    assert (m.model.fused_decode is not None) is fused
    torch.testing.assert_close(one_decode_step(m), one_decode_step(loaded_on("torch")),
                               rtol=2e-3, atol=2e-3)


def test_a_fresh_directory_gets_the_library_built(tmp_path):
    r = run_python("from pdserve.engine import cpu_kernels; k = cpu_kernels.kernel(); "
                   "print(k.path if k else cpu_kernels.why_not())",
                   PDSERVE_KERNEL_DIR=str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    built = list((tmp_path / "k").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and str(built[0]) in r.stdout
    assert not list((tmp_path / "k").glob("*.tmp"))  # the temporary file was renamed in place


def test_the_fast_gguf_reader_gives_what_gguf_s_reader_gives():
    """engine/gguf_file.py against the `gguf` package's reader on the default model: every
    field's value and every tensor's name, type, shape, dtype and bytes."""
    from pdserve.engine.gguf_file import GGUFFile
    from pdserve.engine.loader import default_model_path

    path = default_model_path()
    reader, fast = gguf.GGUFReader(str(path)), GGUFFile(path)
    ref = {k: f.contents() for k, f in reader.fields.items()}
    assert ref == fast.fields and len(ref["tokenizer.ggml.tokens"]) == 49152
    assert len(reader.tensors) == len(fast.tensors) == 272
    for a, b in zip(reader.tensors, fast.tensors):
        assert (a.name, a.tensor_type) == (b.name, b.tensor_type)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data, b.data), a.name


def _products(model) -> list:
    layers = model.model.layers
    return ([layer.self_attn.qkv_product for layer in layers]
            + [layer.self_attn.o_product for layer in layers]
            + [layer.mlp.gate_up_product for layer in layers]
            + [layer.mlp.down_product for layer in layers] + [model.head_product])


def test_a_decode_only_model_packs_only_when_a_prefill_comes(loaded):
    """A decode worker's model (decode_only): products that read blocks at decode hold no
    packed float32 copy (the start-up's weight packing, and the memory); a prefill, should one
    come, packs them then and gives the bits the eagerly packed model gives, and so does a
    decode step. The head, whose logits come from its blocks at prefill too, packs in
    neither."""
    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.loader import load_model

    lean = load_model(decode_only=True)
    assert lean.backend.name == loaded.backend.name == "cpu-fused"
    assert all(p.quant is not None and p.packed is None for p in _products(lean.model))
    assert all(p.packed is not None for p in _products(loaded.model)[:-1])
    prompt = torch.tensor(list(range(300, 340)))
    out = []
    for m in (loaded, lean):
        pool = KVPool(m.layout, 4)
        first = m.model(prompt, pool.kv, AttnBatch.build([40], [40], [[0]], 64))
        out.append((first, decode_logits(m.model, pool.kv, [41], [[0]], [7], 64), pool.kv))
    # packed by the prefill; the head's logits come from its blocks at prefill too
    assert all(p.packed is not None for p in _products(lean.model)[:-1])
    assert lean.model.head_product.packed is loaded.model.head_product.packed is None
    for a, b in zip(out[0], out[1]):
        assert torch.equal(a, b)


def test_a_float16_kv_cache_stays_close_to_the_float32_one(loaded):
    """The default model with its KV in float16 (--kv-dtype float16): 40 decode steps fed the
    same tokens as over a float32 pool give logits within 0.05 (of about 40) and the same
    greedy token at every step where float32's top two are further apart than that."""
    from dataclasses import replace

    from pdserve.engine.kv_pool import KVPool

    prompt = loaded.tokenizer.encode("The history of the printing press begins in")
    n, tokens = len(prompt), []  # float32's greedy tokens, fed to both

    def run(dtype: str) -> torch.Tensor:
        pool = KVPool(replace(loaded.layout, dtype=dtype), 4)
        steps = [loaded.model(torch.tensor(prompt), pool.kv,
                              AttnBatch.build([n], [n], [[0, 1]], 64))[-1]]
        for i in range(40):
            if len(tokens) == i:
                tokens.append(int(steps[-1].argmax()))
            steps.append(decode_logits(loaded.model, pool.kv, [n + i + 1], [[0, 1]],
                                       [tokens[i]], 64)[0])
        return torch.stack(steps)

    full, half_ = run("float32"), run("float16")
    assert (full - half_).abs().max() < 0.05
    top2 = full.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    assert clear.sum() >= 30
    assert torch.equal(full.argmax(-1)[clear], half_.argmax(-1)[clear])


def test_the_cpu_kernels_refuse_a_bfloat16_kv_cache():
    from pdserve.engine.backend import BackendError
    from pdserve.engine.loader import load_model

    with pytest.raises(BackendError, match="--kv-dtype bfloat16.*float32 or float16"):
        load_model(kv_dtype=torch.bfloat16)
    assert load_model(kv_dtype=torch.float16).layout.dtype == "float16"
