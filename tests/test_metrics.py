"""Eval metric math (vlmquant/eval/metrics.py) against direct computations: KL from top-k log-probs, the
sampled positions, weight errors in both bases, error sums."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlmquant.eval.metrics import ErrorSums, kl_topk, rest_logmass, select_positions, weight_error
from vlmquant.quant.fake import fake_quant_weight


def test_kl_exact_and_topk_bound():
    g = torch.Generator().manual_seed(0)
    logp = F.log_softmax(torch.randn(50, 300, generator=g) * 3, dim=1)
    logq = F.log_softmax(logp + 0.5 * torch.randn(50, 300, generator=g), dim=1)
    exact = F.kl_div(logq.double(), logp.double(), log_target=True, reduction="none").sum(1)
    full = logp.topk(300, dim=1)
    assert torch.allclose(kl_topk(full.indices, full.values, logq), exact, rtol=1e-9, atol=1e-12)
    for k in (1, 10, 100, 299):
        top = logp.topk(k, dim=1)
        coarse = kl_topk(top.indices, top.values, logq, rest_logmass(logp, top.indices))
        assert (coarse >= 0).all() and (coarse <= exact + 1e-9).all(), k  # merging outcomes never raises KL
        if k == 299:  # one vocabulary entry merged with nothing: still exact
            assert torch.allclose(coarse, exact, rtol=1e-6, atol=1e-9)
    top = logp.topk(100, dim=1)
    rest = rest_logmass(logp, top.indices)
    assert kl_topk(top.indices, top.values, logp, rest).abs().max() < 1e-7  # float32 inputs
    assert kl_topk(top.indices, top.values, logq, rest).mean() > 0.5 * exact.mean()  # k=100 keeps most of it here
    with pytest.raises(ValueError, match="rest mass"):
        kl_topk(top.indices, top.values, logq)


def test_select_positions():
    attention = torch.tensor([1] * 40 + [0] * 5, dtype=torch.bool)
    vision = torch.zeros(45, dtype=torch.bool)
    vision[5:25] = True
    pos, is_vis = select_positions(attention, vision, 4)
    assert pos.tolist() == sorted(pos.tolist()) and len(pos) == 8
    assert pos[is_vis].tolist() == [5, 11, 18, 24]  # evenly spaced, ends included
    assert all(not vision[p] and p < 40 for p in pos[~is_vis].tolist())
    assert pos[~is_vis].tolist()[0] == 0 and pos[~is_vis].tolist()[-1] == 39
    every, every_vis = select_positions(attention, vision, 0)
    assert every.tolist() == list(range(40)) and every_vis.sum() == 20


def test_weight_error_bases():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    col = torch.rand(128, generator=g) + 0.5
    rows = torch.rand(32, generator=g) + 0.5
    scaled = w * col
    scaled[-32:] /= rows[:, None]
    q = fake_quant_weight(scaled, 3, 128)
    num, den, num_s, den_s = weight_error(w, q, col, [rows])
    assert num_s / den_s == pytest.approx(float((q - scaled).square().sum() / scaled.square().sum()), rel=1e-6)
    unfolded = q / col
    unfolded[-32:] *= rows[:, None]
    assert num / den == pytest.approx(float((unfolded - w).square().sum() / w.square().sum()), rel=1e-5)
    plain = fake_quant_weight(w, 3, 128)
    a, b, c, d = weight_error(w, plain)
    assert a == pytest.approx(c) and b == pytest.approx(d) and a > 0


def test_error_sums():
    sums = ErrorSums()
    sums.add("x", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    sums.add("x", torch.tensor([0.0]), torch.tensor([2.0]))
    assert sums.relative("x") == pytest.approx((0 + 1 + 4) / (1 + 1 + 4))
    assert math.isnan(sums.relative("empty"))
