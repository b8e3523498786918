"""Fake-quant kernels against values worked out by hand."""
import pytest
import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import (
    fake_quant_act_per_token,
    fake_quant_weight,
    fake_quant_weight_per_channel_sym,
    fake_quant_weight_sym,
)


def test_group_asym_hand_values():
    w = torch.tensor([[-0.3, 0.1, 0.9, 1.2, 2.0, 2.5, 3.0, 4.0]])
    # 2 bits, levels 0..3.
    # group 1: range 1.5 -> scale 0.5, zero round(0.3/0.5) = 1;
    #   w/scale = -0.6, 0.2, 1.8, 2.4 -> round -1, 0, 2, 2 -> +1 -> 0, 1, 3, 3 -> (q-1)*0.5
    # group 2 (all positive): range 2 -> scale 2/3, zero round(-3) clamped to 0;
    #   w/scale = 3, 3.75, 4.5, 6 -> clamped to 3 -> 3 * 2/3 = 2
    expected = torch.tensor([[-0.5, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(fake_quant_weight(w, 2, 4), expected, rtol=0, atol=1e-6)


def test_group_per_row_hand_values():
    w = torch.tensor([[0.0, 0.7, 1.4, 7.0], [-2.0, -1.1, 0.4, 1.5]])
    # 3 bits, levels 0..7, group <= 0: one group per row.
    # row 1: range 7 -> scale 1, zero 0; round(0, .7, 1.4, 7) = 0, 1, 1, 7
    # row 2: range 3.5 -> scale 0.5, zero round(2/0.5) = 4;
    #   w/scale = -4, -2.2, 0.8, 3 -> -4, -2, 1, 3 -> +4 -> 0, 2, 5, 7 -> (q-4)*0.5
    expected = torch.tensor([[0.0, 1.0, 1.0, 7.0], [-2.0, -1.0, 0.5, 1.5]])
    for group in (0, -1, 4):
        torch.testing.assert_close(fake_quant_weight(w, 3, group), expected, rtol=0, atol=1e-6)


def test_zero_point_keeps_exact_zeros_and_range_ends():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, ::7] = 0.0
    q = fake_quant_weight(w, 4, 16)
    assert torch.all(q[:, ::7] == 0)  # every group straddles 0, so 0 is a level
    g, qg = w.view(-1, 16), q.view(-1, 16)
    scale = (g.amax(1) - g.amin(1)) / 15
    # min and max land within half a step of themselves
    assert torch.all((qg.amin(1) - g.amin(1)).abs() <= scale / 2 + 1e-6)
    assert torch.all((qg.amax(1) - g.amax(1)).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_levels_error_and_idempotence(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 256) * torch.rand(8, 1) * 3
    q = fake_quant_weight(w, bits, 128)
    assert q.dtype == w.dtype and q.shape == w.shape
    for row in q.view(-1, 128):
        assert row.unique().numel() <= 2**bits
    g = w.view(-1, 128)
    scale = ((g.amax(1) - g.amin(1)) / (2**bits - 1))[:, None]
    assert torch.all((q.view(-1, 128) - g).abs() <= scale / 2 + 1e-6)
    torch.testing.assert_close(fake_quant_weight(q, bits, 128), q, rtol=0, atol=1e-5)


def test_half_inputs_quantized_in_fp32_with_scales_of_their_dtype():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    for dtype in (torch.float16, torch.bfloat16):
        q = fake_quant_weight(w.to(dtype), 8, 32)
        assert q.dtype == dtype
        # fp32 math, each group's scale rounded to dtype first: q is (code - zero) x a scale of that dtype
        g = w.to(dtype).float().view(-1, 32)
        scale = ((g.amax(1, keepdim=True) - g.amin(1, keepdim=True)) / 255).to(dtype).float()
        zero = (-g.amin(1, keepdim=True) / scale).round().clamp(0, 255)
        code = ((g / scale).round() + zero).clamp(0, 255)
        torch.testing.assert_close(q, ((code - zero) * scale).to(dtype).view(4, 64), rtol=0, atol=0)
        # rounding the scale matters: without it some weights land a step away
        unrounded = fake_quant_weight(w.to(dtype).float(), 8, 32).to(dtype)
        assert (q != unrounded).any()
        w_sym = w.to(dtype)
        scale = (w_sym.float().abs().amax(1, keepdim=True) / 127).to(dtype).float()
        code = (w_sym.float() / scale).round().clamp(-128, 127)
        torch.testing.assert_close(fake_quant_weight_per_channel_sym(w_sym, 8), (code * scale).to(dtype), rtol=0, atol=0)


def test_non_contiguous_input():
    torch.manual_seed(2)
    w = torch.randn(32, 8).t()  # (8, 32), not contiguous
    torch.testing.assert_close(fake_quant_weight(w, 4, 16), fake_quant_weight(w.contiguous(), 4, 16))


def test_bad_group_and_bits():
    with pytest.raises(VlmquantError, match=r"weight of shape \(256, 100\) cannot be split into groups of 128 along the input dim; choose w_group dividing 100"):
        fake_quant_weight(torch.zeros(256, 100), 4, 128)
    with pytest.raises(VlmquantError, match=r"not 2-D \(out, in\) or fused experts"):
        fake_quant_weight(torch.zeros(2, 4, 4, 4), 4, 4)
    with pytest.raises(VlmquantError, match="bits"):
        fake_quant_weight(torch.zeros(4, 4), 0, 4)
    with pytest.raises(VlmquantError, match="bits"):
        fake_quant_weight_per_channel_sym(torch.zeros(4, 4), 1)


def test_per_channel_sym_hand_values():
    w = torch.tensor([[0.62, -1.4, 0.25, 1.13], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, -0.09]])
    # 4 bits: levels -8..7, scale = absmax / 7.
    # row 1: scale 0.2; w/scale = 3.1, -7, 1.25, 5.65 -> 3, -7, 1, 6
    # row 2: absmax 0 -> clamp 1e-5 -> stays 0
    # row 3: scale 0.5/7; w/scale = 0, 7, 0, -1.26 -> 0, 7, 0, -1
    expected = torch.tensor([[0.6, -1.4, 0.2, 1.2], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, -0.5 / 7]])
    torch.testing.assert_close(fake_quant_weight_per_channel_sym(w, 4), expected, rtol=0, atol=1e-6)


def test_per_token_act_hand_values_and_shape():
    x = torch.zeros(2, 3, 4)
    x[1, 2] = torch.tensor([1.27, -0.5, 0.013, 0.0])
    # 8 bits: scale 1.27/127 = 0.01; x/scale = 127, -50, 1.3, 0 -> 127, -50, 1, 0
    q = fake_quant_act_per_token(x, 8)
    assert q.shape == x.shape
    torch.testing.assert_close(q[1, 2], torch.tensor([1.27, -0.5, 0.01, 0.0]), rtol=0, atol=1e-6)
    assert torch.all(q[0] == 0)
    # per-token: each token matches the same token quantized alone
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16) * torch.rand(2, 5, 1) * 10
    q = fake_quant_act_per_token(x, 4)
    for b in range(2):
        torch.testing.assert_close(q[b], fake_quant_weight_per_channel_sym(x[b], 4))
        for t in range(5):
            assert q[b, t].unique().numel() <= 16


def test_quantized_activations_hooks_every_kept_decoder_linear_and_restores(demo_model_path):
    import torch.nn.functional as F

    from vlmquant.models import get_adapter
    from vlmquant.quant.scheme import Scheme
    from vlmquant.quant.model import decoder_linears, quantized_activations

    adapter = get_adapter("qwen2_vl")
    model = adapter.load_model(demo_model_path)
    names = [n for n, _ in decoder_linears(model, adapter)]
    lin = model.get_submodule("model.language_model." + names[0])
    x = torch.randn(2, 5, lin.in_features) * 3
    with quantized_activations(model, adapter, Scheme(8, -1, True, a_bit=4), exclude=[names[1]]) as n:
        assert n == len(names) - 1
        torch.testing.assert_close(lin(x), F.linear(fake_quant_act_per_token(x, 4), lin.weight, lin.bias), rtol=0, atol=0)
        ignored = model.get_submodule("model.language_model." + names[1])
        y = torch.randn(3, ignored.in_features)
        assert torch.equal(ignored(y), F.linear(y, ignored.weight, ignored.bias))
        x.mul_(2)  # the same tensor changed in place is quantized again
        torch.testing.assert_close(lin(x), F.linear(fake_quant_act_per_token(x, 4), lin.weight, lin.bias), rtol=0, atol=0)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_group_sym_hand_values():
    w = torch.tensor([[0.62, -1.4, 0.25, 1.13, 0.3, 0.0, -0.1, 0.05]])
    # 4 bits, levels -8..7, scale = absmax / 7 per group of 4.
    # group 1: scale 0.2; w/scale = 3.1, -7, 1.25, 5.65 -> 3, -7, 1, 6
    # group 2: scale 0.3/7; w/scale = 7, 0, -2.33, 1.17 -> 7, 0, -2, 1
    s2 = 0.3 / 7
    expected = torch.tensor([[0.6, -1.4, 0.2, 1.2, 0.3, 0.0, -2 * s2, s2]])
    torch.testing.assert_close(fake_quant_weight_sym(w, 4, 4), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_sym_levels_and_per_channel(dtype):
    torch.manual_seed(4)
    w = (torch.randn(8, 256) * torch.rand(8, 1)).to(dtype)
    q = fake_quant_weight_sym(w, 3, 128)
    assert q.dtype == dtype
    for g, qg in zip(w.float().view(-1, 128), q.view(-1, 128)):
        scale = (g.abs().amax() / 3).to(dtype).float()  # the scale is rounded to the weight's dtype
        code = (g / scale).round().clamp(-4, 3)
        assert torch.equal(qg, (code * scale).to(dtype))
        assert qg.unique().numel() <= 8
    assert torch.equal(fake_quant_weight_sym(w, 4, -1), fake_quant_weight_per_channel_sym(w, 4))
    with pytest.raises(VlmquantError, match="groups of 128"):
        fake_quant_weight_sym(torch.zeros(4, 100), 4, 128)
