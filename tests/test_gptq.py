"""GPTQ and its Hessians against a textbook column loop written here (OBS form, fp64, no Cholesky, no lazy blocks)."""
import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from vlmquant.errors import VlmquantError
from vlmquant.quant.codes import quantize_weight
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import Scheme
from vlmquant.search.gptq import gptq, gptq_experts
from vlmquant.search.hessian import Hessian, expert_hessians

SCHEMES = [Scheme(4, 32), Scheme(4, 32, True), Scheme(4, -1), Scheme(4, -1, True), Scheme(3, 32), Scheme(8, 64, True)]


def textbook_levels(w, h, bits, group, symmetric, act_order=False, damp=0.01, scale_dtype=None):
    """Frantar et al. 2022 (arXiv 2210.17323) eq. 2-3 one column at a time, in original column indices: quantize
    column j, move the rest of its row by -(w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_j:, then drop j from H⁻¹ by one step of
    Gaussian elimination. Returns (levels (q - zero, or q), scales, zeros), all (out, ·) fp64."""
    W, H = w.double().clone(), h.double().clone()
    n_in = W.shape[1]
    group = group if group > 0 else n_in
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(H.diag(), descending=True, stable=True).tolist() if act_order else range(n_in)
    Hinv = torch.linalg.inv(H + damp * H.diag().mean() * torch.eye(n_in, dtype=H.dtype))
    scales, zeros = {}, {}

    def params(g, wg):
        if symmetric:
            s = wg.abs().amax(1).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
            z = torch.zeros_like(s)
        else:
            s = (wg.amax(1) - wg.amin(1)).clamp(min=1e-5) / (2**bits - 1)
        if scale_dtype is not None:
            s = s.to(scale_dtype).double()
        if not symmetric:
            z = (-wg.amin(1) / s).round().clamp(0, 2**bits - 1)
        scales[g], zeros[g] = s, z

    if act_order:
        for g in range(n_in // group):
            params(g, W[:, g * group:(g + 1) * group].clone())
    levels = torch.zeros_like(W)
    for j in order:
        g = j // group
        if not act_order and j % group == 0:
            params(g, W[:, j:j + group].clone())
        s, z = scales[g], zeros[g]
        r = (W[:, j] / s).round()
        lvl = r.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else torch.clamp(r, -z, 2**bits - 1 - z)
        levels[:, j] = lvl
        d = Hinv[j, j]
        W -= torch.outer((W[:, j] - lvl * s) / d, Hinv[j])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / d
    n_groups = n_in // group
    return levels, torch.stack([scales[g] for g in range(n_groups)], 1), torch.stack([zeros[g] for g in range(n_groups)], 1)


def module_levels(result):
    """Levels (q - zero, or q) of a GPTQResult, fp64."""
    q = result.quantized
    levels = q.codes.double()
    if q.zero_point is not None:
        levels -= q.zero_point.double().repeat_interleave(q.group, dim=1)
    return levels


def calib(n_tokens, n_in, seed, outliers=3, dtype=torch.float64):
    """Correlated inputs with a few outlier channels (x = z A, A mixing channels), like decoder activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    x[:, torch.randperm(n_in, generator=g)[:outliers]] *= 15
    return x.to(dtype)


def hessian_of(x, dtype=torch.float64):
    h = Hessian(x.shape[-1], dtype=dtype)
    h.add(x, torch.ones(x.shape[:-1], dtype=torch.bool))
    return h.value()


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_gptq_codes_equal_the_textbook_loop(scheme, act_order):
    for seed in range(2):
        w = torch.randn(24, 128, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05
        h = hessian_of(calib(400, 128, seed))
        levels, scales, zeros = textbook_levels(w, h, scheme.w_bit, scheme.w_group, scheme.symmetric, act_order)
        for block in (16, 64):  # groups spanning lazy blocks, blocks holding whole groups
            res = gptq(w, h, scheme, act_order=act_order, block=block)
            assert torch.equal(module_levels(res), levels)
            torch.testing.assert_close(res.quantized.scale, scales, rtol=1e-10, atol=0)  # from updated weights
            if not scheme.symmetric:
                assert torch.equal(res.quantized.zero_point.double() + 2 ** (scheme.w_bit - 1), zeros)
            assert (res.perm is not None) == act_order
            assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // res.quantized.group)


def test_gptq_in_bf16_rounds_scales_like_rtn_and_with_a_diagonal_hessian_is_rtn():
    """bf16 weights, fp32 math: a diagonal H moves no error, so the codes are RTN's (quantize_weight) and the weight
    is the fake-quantized one, bit for bit; with a full H the codes match the textbook loop but for a few ties."""
    w = (torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    for scheme in (Scheme(4, 32), Scheme(4, -1, True), Scheme(8, 64)):
        res = gptq(w, torch.diag(torch.rand(128) + 0.5), scheme)
        rtn = quantize_weight(w, scheme)
        assert torch.equal(res.quantized.codes, rtn.codes) and torch.equal(res.quantized.scale, rtn.scale)
        assert res.quantized.scale.dtype == torch.bfloat16 and torch.equal(res.weight(torch.bfloat16), quantizer(scheme).weight(w))
        h = hessian_of(calib(400, 128, 1), torch.float32)
        levels, _, _ = textbook_levels(w, h, scheme.w_bit, scheme.w_group, scheme.symmetric, scale_dtype=torch.bfloat16)
        assert (module_levels(gptq(w, h, scheme)) != levels).double().mean() < 0.01


def linear_inputs(seed, n_samples=4, n_tokens=96, hidden=64):
    """Every linear of a tiny Qwen2 MLP and attention projection set, with its input on structured hidden states."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    mlp = Qwen2MLP(cfg).double()
    q, k, v, o = (torch.nn.Linear(hidden, n, bias=False).double() for n in (hidden, hidden // 2, hidden // 2, hidden))
    x = calib(n_samples * n_tokens, hidden, seed, outliers=2)
    mid = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    attn = calib(n_samples * n_tokens, hidden, seed + 100)
    return [(lin, x) for lin in (q, k, v, mlp.gate_proj, mlp.up_proj)] + [(o, attn), (mlp.down_proj, mid)]


@pytest.mark.parametrize("scheme", [Scheme(4, 32), Scheme(3, 32), Scheme(4, -1, True), Scheme(3, -1)], ids=lambda s: s.name)
def test_gptq_output_error_is_below_rtns_on_every_linear(scheme):
    for seed in range(3):
        for lin, x in linear_inputs(seed):
            w = lin.weight.detach()
            ref = x @ w.T
            for act_order in (False, True):
                gq = gptq(w, hessian_of(x), scheme, act_order=act_order).weight(torch.float64)
                rtn = quantizer(scheme).weight(w)
                # measured 0.24-0.95 of RTN's error here: a GPTQ that moved no error (= RTN) fails
                assert torch.linalg.norm(ref - x @ gq.T) <= 0.97 * torch.linalg.norm(ref - x @ rtn.T)


def test_modality_hessian_with_ratio_one_is_uniform_and_weights_vision_tokens():
    x = calib(300, 48, 0)
    loss = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.9
    vision = torch.arange(300) < 200
    uni, one, two = Hessian(48, dtype=torch.float64), Hessian(48, "modality", 1.0, dtype=torch.float64), \
        Hessian(48, "modality", 2.0, dtype=torch.float64)
    for h in (uni, one, two):
        h.add(x, loss, vision)
    torch.testing.assert_close(one.value(), uni.value(), rtol=1e-12, atol=0)
    xv, xc = x[loss & vision], x[loss & ~vision]
    expected = (2 * xv.T @ xv + xc.T @ xc) / (2 * len(xv) + len(xc))
    torch.testing.assert_close(two.value(), expected, rtol=1e-12, atol=0)
    assert uni.n_tokens == int(loss.sum()) and two.total == 2 * len(xv) + len(xc)


def test_hessian_in_chunks_equals_one_go_and_skips_padding():
    x = calib(2 * 3 * 50, 40, 2).view(6, 50, 40)  # (B, T, C)
    valid = torch.ones(6, 50, dtype=torch.bool)
    valid[:, 40:] = False
    x[~valid] = 1e6  # padding: must not count
    vision = torch.zeros(6, 50, dtype=torch.bool)
    vision[:, 5:25] = True
    whole, parts = Hessian(40, "modality", 1.7, dtype=torch.float64), Hessian(40, "modality", 1.7, dtype=torch.float64)
    whole.add(x, valid, vision)
    for i in range(0, 6, 2):
        parts.add(x[i:i + 2].reshape(-1, 40), valid[i:i + 2].reshape(-1), vision[i:i + 2].reshape(-1))
    torch.testing.assert_close(parts.value(), whole.value(), rtol=1e-12, atol=0)
    assert whole.value().abs().max() < 1e4 and whole.n_tokens == 240


def test_dead_input_columns_get_zero_weight():
    x = calib(300, 64, 4)
    x[:, [3, 40]] = 0
    w = torch.randn(16, 64, dtype=torch.float64)
    for act_order in (False, True):
        res = gptq(w, hessian_of(x), Scheme(4, 32), act_order=act_order)
        deq = res.weight(torch.float64)
        assert (deq[:, [3, 40]] == 0).all() and torch.isfinite(deq).all()
        assert (deq[:, [0, 1, 2]] != 0).any()


def test_moe_experts_get_their_routed_hessians_and_few_tokens_fall_back_to_rtn():
    x = calib(200, 32, 5)
    routes = torch.stack([torch.arange(200) % 3, (torch.arange(200) + 1) % 3], 1)  # top-2 of 4 experts; expert 3 unused
    routes[0, 1] = 3  # one token only
    loss = torch.ones(200, dtype=torch.bool)
    hs = expert_hessians(x, routes, 4, loss, dtype=torch.float64)
    for e in range(3):
        rows = (routes == e).any(1)
        torch.testing.assert_close(hs[e].value(), x[rows].T @ x[rows] / rows.sum(), rtol=1e-12, atol=0)
    assert [h.n_tokens for h in hs] == [(routes == e).any(1).sum().item() for e in range(4)] and hs[3].n_tokens == 1
    w = torch.randn(4, 8, 32, dtype=torch.float64) * 0.05
    out = gptq_experts(w, hs, Scheme(4, 32), min_tokens=16)
    assert [r.rtn for r in out] == [False, False, False, True]
    assert torch.equal(out[3].quantized.codes, quantize_weight(w[3], Scheme(4, 32)).codes)
    assert torch.equal(out[0].quantized.codes, gptq(w[0], hs[0].value(), Scheme(4, 32)).quantized.codes)


@pytest.mark.parametrize("call, message", [
    (lambda: gptq(torch.randn(8, 64), torch.eye(32), Scheme(4, 32)), "Hessian of shape (32, 32) does not match"),
    (lambda: gptq(torch.randn(8, 96), torch.eye(96), Scheme(4, 64)), "cannot be split into groups of 64"),
    (lambda: gptq(torch.randn(8, 64), torch.eye(64), Scheme(4, 32), dampening=0), "dampening=0 must be > 0"),
    (lambda: gptq(torch.randn(8, 64), -torch.eye(64), Scheme(4, 32)), "not positive definite"),
    (lambda: gptq(torch.randn(8, 64), torch.eye(64), Scheme(8, -1, True, "float", 8, "float")), "rounds integer"),
    (lambda: Hessian(64).add(torch.randn(10, 32), torch.ones(10, dtype=torch.bool)), "does not end in the linear's"),
    (lambda: Hessian(64).add(torch.randn(10, 64), torch.ones(9, dtype=torch.bool)), "loss mask of shape (9,)"),
    (lambda: Hessian(64, "modality", 2.0).add(torch.randn(10, 64), torch.ones(10, dtype=torch.bool)), "vision-token mask"),
    (lambda: Hessian(64, "modality"), "needs the layer's MBQ ratio"),
    (lambda: Hessian(64, "diagonal"), "hessian='diagonal' is not one of"),
])
def test_bad_inputs_give_one_line_errors(call, message):
    with pytest.raises(VlmquantError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_act_order_codes_pack_with_compressed_tensors_actorder_weight_and_no_g_idx(symmetric):
    """compressed-tensors' `actorder: weight` keeps contiguous groups and stores no g_idx: GPTQ's act-order codes
    (bf16 weight) pack and unpack to the very weight GPTQ returns."""
    from compressed_tensors.compressors import compress_module, decompress_module
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    scheme = Scheme(4, 128, symmetric)
    res = gptq(lin.weight, hessian_of(calib(600, 256, 6), torch.float32), scheme, act_order=True)
    assert not torch.equal(res.perm, torch.arange(256))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128,
                            actorder="weight")
    initialize_module_for_quantization(lin, QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized"),
                                       force_zero_point=False)
    lin.weight_scale.copy_(res.quantized.scale)
    if not symmetric:
        lin.weight_zero_point.copy_(res.quantized.zero_point)
    lin.weight = torch.nn.Parameter(res.weight(torch.float32), requires_grad=False)
    compress_module(lin)
    assert not any("g_idx" in n for n, _ in lin.named_parameters())
    decompress_module(lin)
    assert torch.equal(lin.weight.to(torch.bfloat16), res.weight(torch.bfloat16))
