"""Expert parallelism across real rank processes (torch.distributed, gloo on CPU): a small
random DeepSeek-V3 checkpoint, each rank holding only its slots' experts (redundant ones
included) and its own requests, against the single-process engine on the same requests."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.ep.placement import SlotMap
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.ep_ranks import collect, run_rank, spawn
from tests.engine.random_models import make_skewed_deepseek, saved_deepseek

pytestmark = pytest.mark.integration  # starts processes

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    return saved_deepseek(tmp_path_factory, "dsv3-ep", 4321)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start_group(tmp_path, model_dir, world: int, redundant: int, requests: dict,
                max_tokens: int = MAX_TOKENS, **kw) -> tuple[list, object]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    init = f"file://{tmp_path / 'rendezvous'}"
    return spawn(run_rank, world, lambda r: (r, world, init, str(model_dir), redundant,
                                             requests, max_tokens), **kw)


def run_group(tmp_path, model_dir, world: int, redundant: int, requests: dict, **kw) -> dict:
    procs, q = start_group(tmp_path, model_dir, world, redundant, requests, **kw)
    got = {rank: (outs, info) for rank, outs, info in collect(procs, q, 300)}
    assert [p.exitcode for p in procs] == [0] * world
    return got


def single_process(model_dir, requests: dict, max_tokens: int = MAX_TOKENS) -> dict:
    loaded = load_model(model_dir, block_tokens=16)
    logits: dict[str, list[torch.Tensor]] = {}
    from pdserve.engine.scheduler import BatchKind

    class Recording(LLMEngine):
        def postprocess(self, batch, result):
            for i, c in enumerate(batch.chunks):
                if batch.kind is BatchKind.DECODE or c.completes_prompt:
                    logits.setdefault(c.seq.request_id, []).append(result[i].clone())
            return super().postprocess(batch, result)

    pages = sum(loaded.layout.pages_for(len(p) + max_tokens) for per_rank in requests.values()
                for p, _ in per_rank.values())
    eng = Recording(ModelRunner(loaded.model, KVPool(loaded.layout, pages + 1),
                                prefill_chunk_tokens=19))
    seqs = {rid: eng.add_request(rid, p, SamplingParams(max_tokens=max_tokens))
            for per_rank in requests.values() for rid, (p, _) in per_rank.items()}
    while eng.has_work:
        eng.step()
    return {rid: (s.output, logits[rid]) for rid, s in seqs.items()}


def check_against_single_process(ds_dir, got: dict, requests: dict) -> None:
    ref = single_process(ds_dir, requests)
    for rank, (outs, _) in got.items():
        assert set(outs) == set(requests.get(rank, {}))
        for rid, (tokens, steps) in outs.items():
            want_tokens, want_logits = ref[rid]
            assert len(steps) == len(want_logits) == MAX_TOKENS
            for i, (a, b) in enumerate(zip(steps, want_logits)):
                torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=1e-4,
                                           msg=lambda m, i=i, rid=rid: f"{rid} step {i}: {m}")
            assert tokens == want_tokens, rid


def test_ep2_with_redundant_experts_gives_the_single_process_logits_and_tokens(tmp_path, ds_dir):
    requests = {0: {"a": (prompt(1, 41), 0), "b": (prompt(2, 23), 0)},
                1: {"c": (prompt(3, 30), 0), "d": (prompt(4, 50), 6)}}  # d joins mid-run
    got = run_group(tmp_path, ds_dir, world=2, redundant=2, requests=requests)
    check_against_single_process(ds_dir, got, requests)
    infos = [got[r][1] for r in range(2)]
    assert infos[0]["steps"] == infos[1]["steps"]  # the group stepped together
    # 10 slots over 2 ranks: experts 0-4 on rank 0, 5-7 plus the replicas of 0 and 1 on rank 1.
    assert infos[0]["held"] == [0, 1, 2, 3, 4] and infos[1]["held"] == [0, 1, 5, 6, 7]
    assert all(i["received"] > 0 and i["sent"] > 0 for i in infos)


def test_ep4_with_an_idle_rank_and_one_joining_late(tmp_path, ds_dir):
    requests = {0: {"a": (prompt(5, 37), 0)}, 1: {"b": (prompt(6, 20), 4)},
                2: {"c": (prompt(7, 64), 0), "e": (prompt(8, 9), 0)}}  # rank 3: nothing
    got = run_group(tmp_path, ds_dir, world=4, redundant=4, requests=requests)
    check_against_single_process(ds_dir, got, requests)
    idle = got[3][1]
    assert idle["steps"] == idle["idle_steps"] > 0  # it joined every step with nothing
    assert idle["received"] > 0  # and computed its experts for the others
    assert got[1][1]["idle_steps"] == 4  # before its request joined


def test_eplb_applied_live_moves_experts_and_changes_no_output(tmp_path, ds_dir):
    requests = {0: {"a": (prompt(9, 45), 0), "b": (prompt(10, 12), 2)},
                1: {"c": (prompt(11, 33), 0)}}
    got = run_group(tmp_path, ds_dir, world=2, redundant=2, requests=requests, eplb_interval=8)
    check_against_single_process(ds_dir, got, requests)
    infos = [got[r][1] for r in range(2)]
    assert infos[0]["rebalances"] == infos[1]["rebalances"] >= 3  # every 8 of 30+ steps
    assert infos[0]["phy2log"] == infos[1]["phy2log"]  # one placement, switched together
    default = SlotMap.default([1, 2], 3, 8, 2, 2).phy2log
    assert [tuple(r) for r in infos[0]["phy2log"]] != list(default)  # it did move experts
    before, after = infos[0]["balance"]
    assert after <= before  # the last window's load is no worse spread than before
    assert all(i["canary"] for i in infos)  # every held expert has its checkpoint weights


def test_eplb_on_a_skewed_router_evens_the_load_over_the_ranks(tmp_path):
    """Two hot experts per layer; EP 4 with 4 redundant slots, every replica in turn; the rows
    each rank's experts receive per 8-step window: max/mean drops after the first rebalance,
    and no output changes (a rebalance lands in the middle of the decodes)."""
    ckpt = make_skewed_deepseek(tmp_path / "skewed")
    requests = {r: {f"r{r}-{i}": (prompt(100 * r + i, 24 + 8 * i), i) for i in range(3)}
                for r in range(4)}
    got = run_group(tmp_path, ckpt, world=4, redundant=4, requests=requests, eplb_interval=8,
                    local_first=False)
    check_against_single_process(ckpt, got, requests)

    def ratio(window: int) -> float:
        loads = []
        for r in range(4):
            marks = [0, *got[r][1]["received_at"], got[r][1]["received"]]
            loads.append(marks[window + 1] - marks[window])
        return max(loads) / (sum(loads) / 4)

    assert got[0][1]["rebalances"] >= 3 and all(got[r][1]["canary"] for r in range(4))
    before, after = ratio(0), [ratio(w) for w in (1, 2)]
    assert before > 1.4 and max(after) < 1.3 and max(after) < before, (before, after)


def test_random_placements_give_the_same_outputs(tmp_path, ds_dir):
    g = torch.Generator().manual_seed(17)
    phy2log = []
    for _ in range(2):  # the two MoE layers: experts shuffled over slots, 4 random replicas
        layer = torch.randperm(8, generator=g).tolist() + torch.randint(0, 8, (4,),
                                                                         generator=g).tolist()
        phy2log.append([layer[i] for i in torch.randperm(12, generator=g).tolist()])
    requests = {0: {"a": (prompt(12, 40), 0)}, 1: {"b": (prompt(13, 26), 0)}}
    got = run_group(tmp_path, ds_dir, world=2, redundant=4, requests=requests, phy2log=phy2log,
                    idle_rounds=5)
    check_against_single_process(ds_dir, got, requests)
    assert got[0][1]["phy2log"][1:] == phy2log
    for rank in range(2):  # all idle: only the step agreements, no MoE exchange
        info = got[rank][1]
        assert info["idle_exchanges"] == 0 and info["agreements"] >= info["steps"] + 5


def test_a_dead_rank_makes_the_others_exit_with_an_error_not_hang(tmp_path, ds_dir):
    import time

    requests = {0: {"a": (prompt(14, 30), 0)}, 1: {"b": (prompt(15, 30), 0)}}
    procs, _ = start_group(tmp_path, ds_dir, 2, 2, requests, exit_at=(1, 3))
    t0 = time.monotonic()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [1, 3], [p.exitcode for p in procs]
    assert time.monotonic() - t0 < 90  # well within the group's collective timeout + start


def test_slot_choice_prefers_the_own_rank_then_spreads_replicas_by_position_and_rank():
    s = SlotMap.default([0], 1, num_experts=4, ep_size=2, redundant=2)  # slots: 0 1 2 3 | 0 1
    idx = torch.tensor([[0, 2], [1, 3], [0, 2], [1, 3]])
    # rank 1 holds slots 3, 4 (expert 0), 5 (expert 1): its own replicas first
    assert s.choose(0, idx, rank=1).tolist() == [[4, 2], [5, 3], [4, 2], [5, 3]]
    # rank 0 holds slots 0..2: own replica of 0, 1, 2; expert 3 only in slot 3
    assert s.choose(0, idx, rank=0).tolist() == [[0, 2], [1, 3], [0, 2], [1, 3]]
    t = SlotMap.from_phy2log([[0, 1, 2, 3, 0, 0]], [0], 1, 4, ep_size=3)  # slots of rank 2: 4, 5
    got = t.choose(0, torch.tensor([[0], [0], [0]]), rank=1)  # rank 1 (slots 2, 3): no 0
    assert got.flatten().tolist() == [4, 5, 0]  # (position + rank) mod 3 replicas [0, 4, 5]
    spread = SlotMap.default([0], 1, num_experts=4, ep_size=2, redundant=2, local_first=False)
    # every replica in turn: the same pairs of ranks 0 and 1 go to different replicas
    assert spread.choose(0, idx, rank=0).tolist() == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert spread.choose(0, idx, rank=1).tolist() == [[4, 2], [5, 3], [4, 2], [5, 3]]
    with pytest.raises(ValueError, match="every expert"):
        SlotMap.from_phy2log([[0, 1, 2, 2]], [0], 1, 4, ep_size=2)
    with pytest.raises(ValueError, match="split evenly"):
        SlotMap.default([0], 1, num_experts=4, ep_size=3)


def test_two_batch_overlap_gives_the_same_bits_across_ranks(tmp_path, ds_dir):
    """EP 2, batch-invariant products: overlap on and off, the same logits and KV pages
    bitwise on every rank: prompts cut between the micro-batches, decode steps split by
    sequence, and rank 1 idle until its request joins (two empty halves)."""
    requests = {0: {"a": (prompt(16, 57), 0), "b": (prompt(17, 21), 0)},
                1: {"c": (prompt(18, 44), 3), "d": (prompt(19, 30), 3)}}
    runs = {mode: run_group(tmp_path / mode, ds_dir, world=2, redundant=2, requests=requests,
                            tbo=mode, batch_invariant=True) for mode in ("off", "on")}
    for rank in range(2):
        (outs_off, off), (outs_on, on) = runs["off"][rank], runs["on"][rank]
        assert off["overlapped"] == 0 and on["overlapped"] > 0
        assert on["idle_steps"] == 3  # rank 1 idle, rank 0 alone: no veto, still overlapped
        for rid, (tokens, steps) in outs_off.items():
            assert outs_on[rid][0] == tokens
            for i, (a, b) in enumerate(zip(steps, outs_on[rid][1])):
                assert (a == b).all(), f"{rid} step {i}: max diff {abs(a - b).max()}"
        assert (off["kv"] == on["kv"]).all()
    # Rank 0 overlapped its steps alone while rank 1 idled (then both): every step but those
    # where some rank had a single decode left.
    assert runs["on"][0][1]["overlapped"] >= runs["on"][0][1]["steps"] // 2
    check_against_single_process(ds_dir, runs["on"], requests)


def test_fp8_dispatch_over_gloo_is_close_and_carries_fewer_bytes(tmp_path, ds_dir):
    """The rows travel as float8 bytes over gloo (which refuses float8 tensors), with their
    scales; the logits stay near the exact run's (hidden 96: one scale per row)."""
    requests = {0: {"a": (prompt(20, 33), 0)}, 1: {"b": (prompt(21, 26), 0)}}
    exact = run_group(tmp_path / "exact", ds_dir, 2, 2, requests)
    fp8 = run_group(tmp_path / "fp8", ds_dir, 2, 2, requests, dispatch="fp8", tbo="on")
    for rank in range(2):
        info = fp8[rank][1]
        assert info["sent_bytes"] == info["sent"] * (96 + 4)  # e4m3 bytes + one f32 scale
        assert exact[rank][1]["sent_bytes"] == exact[rank][1]["sent"] * 96 * 4
        for rid, (_, steps) in exact[rank][0].items():
            first = torch.from_numpy(steps[0])  # the prefill's logits (same context)
            got = torch.from_numpy(fp8[rank][0][rid][1][0])
            rel = ((got - first).norm() / first.norm()).item()
            assert 0 < rel < 0.05, (rid, rel)


def test_ranks_started_with_different_overlap_or_dispatch_settings_refuse_to_start(tmp_path,
                                                                                   ds_dir):
    from tests.engine.ep_ranks import join_rank

    for name, flags in (("--tbo", [{"tbo": "on"}, {"tbo": "off"}]),
                        ("--ep-dispatch-dtype", [{"ep_dispatch_dtype": "fp8"}, {}])):
        init = f"file://{tmp_path / name.strip('-')}"
        got = sorted(collect(*spawn(join_rank, 2, lambda r, init=init, flags=flags: (
            r, 2, init, str(ds_dir), flags[r])), 120))
        assert [kind for _, kind, _ in got] == ["EPError", "EPError"], got
        assert all(msg.startswith(f"{name}: the ranks of the EP group disagree")
                   for _, _, msg in got), got
