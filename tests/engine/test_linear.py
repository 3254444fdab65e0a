"""Fused and packed linears (engine/linear.py) compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.linear import FastLinear, fuse_rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 300])
def test_packed_linear_matches_f_linear(bias, rows):
    torch.manual_seed(rows)
    lin = nn.Linear(96, 200, bias=bias)
    fast = FastLinear(lin.weight, lin.bias, pack=True)
    if torch.backends.mkldnn.is_available():
        assert fast.packed is not None
    x = torch.randn(rows, 96)
    torch.testing.assert_close(fast(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_packing_is_the_backend_s_choice():
    lin = nn.Linear(8, 4)
    fast = FastLinear(lin.weight, lin.bias, pack=False)
    assert fast.packed is None
    x = torch.randn(3, 8)
    assert torch.equal(fast(x), F.linear(x, lin.weight, lin.bias))


def test_bfloat16_weights_cannot_be_packed():
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    assert FastLinear(lin.weight).packed is None
    with pytest.raises(ValueError, match="float32 on CPU"):
        FastLinear(lin.weight, pack=True)


def test_fused_rows_are_views_and_compute_each_projection():
    torch.manual_seed(0)
    q, k, v = nn.Linear(32, 48, bias=True), nn.Linear(32, 16, bias=False), nn.Linear(32, 16)
    before = {n: t.clone() for m, p in ((q, "q"), (k, "k"), (v, "v"))
              for n, t in ((f"{p}.w", m.weight), (f"{p}.b", m.bias)) if t is not None}
    fused = fuse_rows(q, k, v)
    # Parameters keep their values and become views of the one fused weight (no copy kept).
    assert torch.equal(q.weight, before["q.w"]) and torch.equal(v.bias, before["v.b"])
    assert q.weight.data_ptr() == fused.weight.data_ptr()
    assert k.weight.data_ptr() == fused.weight[48:].data_ptr()
    x = torch.randn(7, 32)
    out_q, out_k, out_v = fused(x).split([48, 16, 16], dim=-1)
    torch.testing.assert_close(out_q, F.linear(x, before["q.w"], before["q.b"]))
    torch.testing.assert_close(out_k, F.linear(x, before["k.w"]))  # no bias: zeros in the fused one
    torch.testing.assert_close(out_v, F.linear(x, before["v.w"], before["v.b"]))
