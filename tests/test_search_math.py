"""Loss formulas, scale folding and the per-group grid search on tiny synthetic groups."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from conftest import run_spec
from vlmquant.errors import VlmquantError
from vlmquant.models.base import ScaleGroup
from vlmquant.quant.fake import fake_quant_act_per_token, fake_quant_weight, fake_quant_weight_per_channel_sym
from vlmquant.quant.fold import fold_scales, scale_linear_into_linears, scale_norm_into_linears
from vlmquant.quant.scheme import Scheme
from vlmquant.search.grid import GroupSearch, group_loss, search_group
from vlmquant.search.plan import group_width
from vlmquant.search.smooth import smooth_group, smoothquant_scales

# ---- group_loss -------------------------------------------------------------------------

# 4 tokens x 2 channels: tokens 0, 1 vision, token 2 caption, token 3 padding (also flagged
# caption, which valid must override).
OUT_FP = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
OUT_Q = torch.tensor([[1.0, 1.0], [2.0, 4.0], [4.0, 4.0], [0.0, 0.0]])
MASKS = {
    "vis": torch.tensor([True, True, False, False]),
    "cap": torch.tensor([False, False, True, True]),
    "valid": torch.tensor([True, True, True, False]),
}
# |d| = [[0, 1], [1, 0], [1, 2], [7, 8]]    d^2 = [[0, 1], [1, 0], [1, 4], [49, 64]]


@pytest.mark.parametrize(
    "loss, ratio, expected",
    [
        ("mae", None, (1 + 1 + 3) / 6),  # valid tokens 0-2, 6 elements
        ("mae", 2.0, (3 + 2.0 * (1 + 1)) / ((1 + 2) * 2)),  # (sum cap + rho sum vis) / (N_cap + N_vis)
        ("mse", None, (1 + 1 + 5) / 6),
        ("mse", 2.0, 5 / 2 + 2.0 * (1 + 1) / 4),  # mean cap + rho mean vis
    ],
)
def test_group_loss_hand_values(loss, ratio, expected):
    assert group_loss(OUT_FP, OUT_Q, MASKS, loss, ratio) == pytest.approx(expected, rel=1e-6)
    # (B, T, C) outputs with (B, T) masks, and half inputs, give the same number
    masks_bt = {k: v.view(2, 2) for k, v in MASKS.items()}
    assert group_loss(OUT_FP.view(2, 2, 2), OUT_Q.view(2, 2, 2), masks_bt, loss, ratio) == pytest.approx(expected, rel=1e-6)
    assert group_loss(OUT_FP.half(), OUT_Q.half(), MASKS, loss, ratio) == pytest.approx(expected, rel=1e-6)


def test_group_loss_empty_vision_and_bad_input():
    masks = dict(MASKS, vis=torch.zeros(4, dtype=torch.bool))
    assert group_loss(OUT_FP, OUT_Q, masks, "mse", 3.0) == pytest.approx(5 / 2)
    assert group_loss(OUT_FP, OUT_Q, masks, "mae", 3.0) == pytest.approx(3 / 2)
    with pytest.raises(VlmquantError, match="loss="):
        group_loss(OUT_FP, OUT_Q, MASKS, "l1")
    with pytest.raises(VlmquantError, match="masks cover 3 tokens"):
        group_loss(OUT_FP, OUT_Q, {k: v[:3] for k, v in MASKS.items()})
    with pytest.raises(VlmquantError, match="no caption or vision"):
        group_loss(OUT_FP, OUT_Q, dict(masks, cap=torch.zeros(4, dtype=torch.bool)), "mae", 1.0)


# ---- folding scales keeps the fp function ---------------------------------------------


def _positive_scales(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 4 + 0.1


@pytest.mark.parametrize("norm_cls", [Qwen2RMSNorm, nn.LayerNorm])
def test_scale_norm_into_linears_keeps_outputs(norm_cls):
    torch.manual_seed(0)
    norm = norm_cls(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    q, k, v = nn.Linear(32, 32), nn.Linear(32, 16, bias=False), nn.Linear(32, 16)
    x = torch.randn(2, 5, 32)
    before = [lin(norm(x)) for lin in (q, k, v)]
    scale_norm_into_linears(norm, [q, k, v], _positive_scales(32, 1))
    for b, lin in zip(before, (q, k, v)):
        torch.testing.assert_close(lin(norm(x)), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prev_out", [24, 40])  # 24: all rows; 40: only the last 24 rows feed `nxt`
def test_scale_linear_into_linears_keeps_outputs(bias, prev_out):
    torch.manual_seed(0)
    prev, nxt = nn.Linear(24, prev_out, bias=bias), nn.Linear(24, 24, bias=bias)
    x = torch.randn(6, 24)
    f = lambda: (prev(x)[:, :-24], nxt(prev(x)[:, -24:]))  # noqa: E731
    head_before, before = f()
    scale_linear_into_linears(prev, [nxt], _positive_scales(24, 2))
    head_after, after = f()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head_after, head_before, rtol=0, atol=0)  # rows before the tail untouched


def _root():
    """A module with a two-layer decoder stack named like a model's layer root: layers.{i}.norm → a, b; a → c."""
    layers = nn.ModuleList(nn.ModuleDict({"norm": Qwen2RMSNorm(8), "a": nn.Linear(8, 8), "b": nn.Linear(8, 4),
                                          "c": nn.Linear(8, 4), "d": nn.Linear(6, 4)}) for _ in range(2))
    root = nn.Module()
    root.layers = layers
    return root


@pytest.mark.parametrize("entries, error", [
    ([("layers.0.norm", ("layers.0.a", "layers.0.d"), torch.full((8,), 2.0))], "layers.0.d has 6 input channels"),
    ([("layers.0.b", ("layers.0.c",), torch.ones(8))], "layers.0.b does not have 8 output channels"),
    ([("layers.0.norm", ("layers.0.a",), torch.ones(4))], "layers.0.a has 8 input channels, the cache has 4"),
    ([("layers.0.norm", ("layers.0.nope",), torch.ones(8))], "module 'layers.0.nope' does not exist"),
    ([("layers.0.norm", ("layers.0.a",), torch.tensor([1.0] * 7 + [0.0]))], "entry 1 (layers.0.norm): scales must be finite and positive"),
    ([("layers.0.norm", ("layers.0.a",), torch.tensor([1.0] * 7 + [float("nan")]))], "must be finite and positive"),
    ([("layers.0.norm", ("layers.0.norm",), torch.ones(8))], "layers.0.norm is a Qwen2RMSNorm, not a linear layer"),
    ([("layers.1.a", ("layers.1.c",), torch.ones(8))], "covers decoder layers [1], the model has 2"),
])
def test_scale_cache_resolution_names_the_entry_and_changes_nothing(entries, error):
    root = _root()
    ok = ("layers.1.norm", ("layers.1.a", "layers.1.b"), torch.full((8,), 3.0))  # valid, and listed first
    snapshot = {k: v.clone() for k, v in root.state_dict().items()}
    with pytest.raises(VlmquantError) as e:
        fold_scales(root, [ok, *entries], "cache.pt", n_layers=2)
    assert error in str(e.value) and str(e.value).startswith("cache.pt: ")
    assert all(torch.equal(v, snapshot[k]) for k, v in root.state_dict().items())


# ---- grid search -------------------------------------------------------------------------


def _group(outliers=True, dtype=torch.float32, seed=0):
    """RMSNorm -> two linears on 2 samples x 12 tokens; sample 1 has 3 padding tokens."""
    torch.manual_seed(seed)
    C = 64
    norm = Qwen2RMSNorm(C)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if outliers:
            norm.weight[[3, 17, 40]] *= 30
    lins = [nn.Linear(C, 32, bias=False), nn.Linear(C, 48)]
    norm, lins = norm.to(dtype), [lin.to(dtype) for lin in lins]
    x_in = torch.randn(2, 12, C, dtype=dtype)  # (B, T, C)
    masks = {k: torch.zeros(2, 12, dtype=torch.bool) for k in ("vis", "cap", "valid")}
    masks["valid"][0], masks["valid"][1, :9] = True, True
    masks["vis"][:, 1:6] = True
    masks["cap"][0, 8:], masks["cap"][1, 7:9] = True, True

    def forward():
        h = norm(x_in)
        return torch.cat([lin(h) for lin in lins], dim=-1)  # (B, T, 80)

    with torch.no_grad():
        x, fp_out = norm(x_in), forward()
    return norm, lins, x_in, x, forward, fp_out, masks


def run_group(search, x, lins, forward, fp_out, masks, ratio=None, **cfg):
    """`search` on the group as one sample micro-batch, under the run settings `cfg` (runs.<name> keys)."""
    return search(GroupSearch(x, lins, [forward], [fp_out], [masks], masks, ratio=ratio), run_spec("t", **cfg))


W3G32, W4A8 = {"method": "awq", "w_bit": 3, "w_group": 32}, {"method": "mbq", "w_bit": 4, "a_bit": 8}


def _loss_with_weights(forward, fp_out, masks, lins, new_weights, loss, ratio):
    old = [lin.weight.detach().clone() for lin in lins]
    with torch.no_grad():
        for lin, w in zip(lins, new_weights):
            lin.weight.copy_(w)
        value = group_loss(fp_out, forward(), masks, loss, ratio)
        for lin, w in zip(lins, old):
            lin.weight.copy_(w)
    return value


@pytest.mark.parametrize("loss, ratio", [("mae", None), ("mae", 2.0), ("mse", 0.5)])
def test_search_beats_rtn_restores_weights_and_reproduces(loss, ratio):
    norm, lins, _, x, forward, fp_out, masks = _group()
    before = [lin.weight.detach().clone() for lin in lins] + [lins[1].bias.detach().clone()]
    r = run_group(search_group, x, lins, forward, fp_out, masks, ratio, **W3G32, loss=loss)

    assert all(torch.equal(p, b) for p, b in zip([lin.weight for lin in lins] + [lins[1].bias], before))
    assert len(r.losses) == 20 and r.alpha == r.best_index / 20
    assert r.scales.dtype == torch.float32 and r.scales.shape == (64,)
    rtn = _loss_with_weights(forward, fp_out, masks, lins, [fake_quant_weight(w, 3, 32) for w in before[:2]], loss, ratio)
    assert r.losses[0] == pytest.approx(rtn, rel=1e-6)
    assert r.losses[r.best_index] == min(r.losses)
    assert r.alpha > 0 and r.losses[r.best_index] < rtn  # outlier channels make scaling pay

    # fold the scales, quantize with plain RTN: the model now computes the chosen loss
    scale_norm_into_linears(norm, lins, r.scales)
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(fake_quant_weight(lin.weight, 3, 32))
        assert group_loss(fp_out, forward(), masks, loss, ratio) == pytest.approx(r.losses[r.best_index], rel=1e-4)


def test_search_ties_keep_rtn():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randint(0, 2, (10, 16)).float() * 2 - 1  # |x| = 1 everywhere: every alpha gives s = 1
    masks = {"valid": torch.ones(10, dtype=torch.bool), "vis": torch.zeros(10, dtype=torch.bool), "cap": torch.ones(10, dtype=torch.bool)}
    with torch.no_grad():
        fp_out = lin(x)
    r = run_group(search_group, x, [lin], lambda: lin(x), fp_out, masks, method="awq", w_bit=2, w_group=8)
    assert len(set(r.losses)) == 1 and r.best_index == 0 and r.alpha == 0.0
    assert torch.equal(r.scales, torch.ones(16))
    # a forward whose loss never changes also keeps alpha = 0
    r = run_group(search_group, x, [lin], lambda: fp_out + 1, fp_out, masks, method="awq", w_bit=2, w_group=8,
                  n_grid=5)
    assert r.losses == [1.0] * 5 and r.best_index == 0


def test_search_ignores_padding():
    _, lins, x_in, x, forward, fp_out, masks = _group()
    r = run_group(search_group, x, lins, forward, fp_out, masks, 1.5, method="mbq", w_bit=4, w_group=16)
    with torch.no_grad():
        x_in[1, 9:] = 1e4  # padding positions of sample 1
        x[1, 9:] = 1e4
        fp_out = forward()
    r2 = run_group(search_group, x, lins, forward, fp_out, masks, 1.5, method="mbq", w_bit=4, w_group=16)
    assert r2.best_index == r.best_index
    assert r2.losses == pytest.approx(r.losses, rel=1e-6)


def test_search_weight_activation_mode():
    norm, lins, x_in, x, forward, fp_out, masks = _group()
    before = [lin.weight.detach().clone() for lin in lins]
    r = run_group(search_group, x, lins, forward, fp_out, masks, **W4A8)
    assert all(torch.equal(lin.weight, b) for lin, b in zip(lins, before))
    assert all(len(lin._forward_pre_hooks) == 0 for lin in lins)

    def wa_forward(s):  # the folded, W-A quantized group: Q_a(h / s) . Q_w(W s)^T
        with torch.no_grad():
            h = fake_quant_act_per_token(norm(x_in) / s, 8)
            return torch.cat([F.linear(h, fake_quant_weight_per_channel_sym(lin.weight * s, 4), lin.bias) for lin in lins], -1)

    assert r.losses[0] == pytest.approx(group_loss(fp_out, wa_forward(torch.ones(64)), masks), rel=1e-6)
    assert r.losses[r.best_index] == min(r.losses) < r.losses[0]
    assert group_loss(fp_out, wa_forward(r.scales), masks) == pytest.approx(r.losses[r.best_index], rel=1e-4)


def test_smooth_group_keeps_smoothquant_scales_and_reports_rtn():
    norm, lins, x_in, x, forward, fp_out, masks = _group()
    before = [lin.weight.detach().clone() for lin in lins]
    with torch.no_grad():
        x[1, 9:] = 1e4  # padding positions of sample 1 must not enter max|X|
    r = run_group(smooth_group, x, lins, forward, fp_out, masks, method="smoothquant", w_bit=4, a_bit=8, alpha=0.6)
    assert all(torch.equal(lin.weight, b) for lin, b in zip(lins, before))
    assert all(len(lin._forward_pre_hooks) == 0 for lin in lins)
    x_max = x.reshape(-1, 64)[masks["valid"].reshape(-1)].abs().amax(0)
    torch.testing.assert_close(r.scales, smoothquant_scales(x_max, lins, 0.6))
    assert r.alpha == 0.6 and r.best_index == 1 and len(r.losses) == 2
    rtn = run_group(search_group, x, lins, forward, fp_out, masks, **W4A8, n_grid=1)
    assert r.losses[0] == rtn.losses[0]

    def wa_forward(s):  # the folded, W-A quantized group: Q_a(h / s) . Q_w(W s)^T
        with torch.no_grad():
            h = fake_quant_act_per_token(norm(x_in) / s, 8)
            return torch.cat([F.linear(h, fake_quant_weight_per_channel_sym(lin.weight * s, 4), lin.bias) for lin in lins], -1)

    assert group_loss(fp_out, wa_forward(r.scales), masks) == pytest.approx(r.losses[1], rel=1e-4)


def test_search_half_precision_group():
    _, lins, _, x, forward, fp_out, masks = _group(dtype=torch.bfloat16)
    before = [lin.weight.detach().clone() for lin in lins]
    r = run_group(search_group, x, lins, forward, fp_out, masks, method="awq", w_bit=4, w_group=32, n_grid=4)
    assert all(torch.equal(lin.weight, b) for lin, b in zip(lins, before))
    assert r.scales.dtype == torch.float32 and r.losses[r.best_index] <= r.losses[0]


def test_the_plan_checks_a_group_before_any_search():
    norm, lins, *_ = _group()
    layer = nn.ModuleDict({"norm": norm, "a": lins[0], "b": lins[1]})
    assert group_width(layer, 3, ScaleGroup("norm", ("a", "b"), "norm", "attn"), Scheme(4, 32)) == 64
    with pytest.raises(VlmquantError, match=r"decoder layer 3 a: weight of shape \(32, 64\) cannot be split into groups of 48"):
        group_width(layer, 3, ScaleGroup("norm", ("a", "b"), "norm", "attn"), Scheme(4, 48))
    layer["c"] = nn.Linear(32, 8)
    with pytest.raises(VlmquantError, match=r"decoder layer 3 c: weight of shape \(8, 32\) does not take the group input's 64"):
        group_width(layer, 3, ScaleGroup("norm", ("a", "c"), "norm", "attn"), Scheme(4, 32))


def test_smoothquant_scales_hand_values():
    w1, w2 = nn.Linear(3, 2, bias=False), nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        w1.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 1.0, 0.0]]))
        w2.weight.copy_(torch.tensor([[-4.0, 0.5, 0.0]]))
    # column max |W| = 4, 2, 0 -> 1e-5; x max = 4, 1, 0 -> 1e-5
    s = smoothquant_scales(torch.tensor([4.0, 1.0, 0.0]), [w1, w2], 0.5)
    torch.testing.assert_close(s, torch.tensor([1.0, 2**-0.5, 1.0]))
    s = smoothquant_scales(torch.tensor([4.0, 1.0, 0.0]), [w1, w2], 0.8)
    torch.testing.assert_close(s, torch.tensor([4**0.8 / 4**0.2, 1 / 2**0.2, 1e-5**0.8 / 1e-5**0.2]))
