"""FP4 (NVFP4, MXFP4) fake quantization and packing equal compressed-tensors' own quantize -> dequantize and
decompression, bit for bit (vlmquant.quant.fp4)."""
import pytest
import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant import fp4
from vlmquant.quant.scheme import MXFP4_PACK_QUANTIZED, NVFP4_PACK_QUANTIZED, Scheme, check_scheme

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization.quant_scheme import MXFP4, MXFP4A16, NVFP4, NVFP4A16  # noqa: E402
from compressed_tensors.quantization.utils import (calculate_qparams, compute_dynamic_scales_and_zp,  # noqa: E402
                                                   generate_gparam)

NVFP4_W4A4 = Scheme(4, 16, True, "nvfp4", 4, "float")
NVFP4_A16 = Scheme(4, 16, True, "nvfp4")
MXFP4_A16 = Scheme(4, 32, True, "mxfp4")
MXFP4_W4A4 = Scheme(4, 32, True, "mxfp4", 4, "float")
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # halfway between grid neighbours


def weight(shape, dtype, seed=0):
    """Random weight with what trips quantizers: an all-zero group, an all-negative group, outliers, scattered
    zeros, a row 1e-4 smaller than the rest, and a row of E2M1 ties (x 0.125: exact at global scale 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[w.abs() < 0.002] = 0
    w[..., 0, :32] = 0
    w[..., 1, 32:64] = -w[..., 1, 32:64].abs()
    w[..., 2, 7] = 0.9
    w[..., 3, 40] = -1.3
    w[..., 4, :] *= 1e-4
    ties = torch.tensor([6.0] + TIES + [-t for t in TIES] + [-6.0]) * 0.125
    w[..., 5, :16] = ties
    w[..., 5, 32:48] = ties
    return w.to(dtype)


def ct_nvfp4(w, global_scale=None):
    """compressed-tensors' NVFP4 weight quantize -> dequantize of one (out, in) weight, scales taken as
    llm-compressor's min-max observer takes them (statistics in w's dtype, weight_scale kept in w's dtype)."""
    args = NVFP4A16["weights"]
    gs = generate_gparam(*torch.aminmax(w)) if global_scale is None else global_scale
    g = w.unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    scale = scale.to(w.dtype)
    q = ct_forward.quantize(w, scale, zp, args, global_scale=gs)
    return ct_forward.dequantize(q, scale, zp, args, dtype=w.dtype, global_scale=gs), gs, scale


def ct_mxfp4(w):
    args = MXFP4A16["weights"]
    g = w.unflatten(-1, (-1, 32))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q = ct_forward.quantize(w, scale, zp, args)
    return ct_forward.dequantize(q, scale, zp, args, dtype=w.dtype), scale


def nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Textbook: the grid value nearest to clamp(x, -6, 6), ties to the even code (index 0, 2, 4, 6)."""
    grid = torch.tensor(GRID, dtype=torch.float64)
    out = []
    for v in x.double().clamp(-6, 6).tolist():
        d = (grid - abs(v)).abs()
        best = [i for i in range(8) if d[i] == d.min()]
        i = best[0] if len(best) == 1 else next(i for i in best if i % 2 == 0)
        out.append(grid[i].item() if v >= 0 else -grid[i].item())
    return torch.tensor(out, dtype=x.dtype)


def test_e2m1_grid_is_exactly_the_sixteen_values():
    values = fp4.round_e2m1_(torch.linspace(-9, 9, 36001))
    assert set(values.abs().tolist()) == set(GRID)
    assert set(values.tolist()) == set(GRID) | {-v for v in GRID}


def test_e2m1_rounding_ties_to_even_and_clamps():
    x = torch.tensor(TIES + [-t for t in TIES] + [6.5, 100.0, -7.0, 0.2, 0.3])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, 6.0, 6.0, -6.0, 0.0, 0.5]
    assert fp4.round_e2m1_(x.clone()).tolist() == want
    r = torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(fp4.round_e2m1_(r.clone()), nearest_e2m1(r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_nvfp4_weight_equals_compressed_tensors(dtype):
    w = weight((48, 128), dtype)
    w[4] *= 0.1  # groups whose E4M3 scale underflows to 0: compressed-tensors stores 0.125
    want, gs, scale = ct_nvfp4(w)
    assert torch.equal(fp4.nvfp4_global_scale(w), gs)
    got = fp4.fake_quant_weight_nvfp4(w)
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(got, w)  # it does quantize
    assert (got[0, :32] == 0).all()
    stored = fp4.pack_fp4(w, NVFP4_A16)["weight_scale"].float()
    assert torch.equal(stored, scale.float()) and (stored[0, :2] == 0.125).all() and (stored[4] == 0.125).any()


def test_nvfp4_global_scale_passed_hits_ties_exactly():
    w = weight((8, 64), torch.float32)
    one = torch.tensor([1.0])
    got = fp4.fake_quant_weight_nvfp4(w, one)
    assert torch.equal(got, ct_nvfp4(w, one)[0])
    # group max 6 x 0.125: scale 0.125 exactly, so the row's codes are the ties rounded to even
    assert torch.equal(got[5, :16] / 0.125, nearest_e2m1(w[5, :16] / 0.125))


def test_shared_global_scale_is_the_smallest_one_as_llm_compressor_fuses_qkv():
    q, v = weight((64, 128), torch.bfloat16, 1), weight((32, 128), torch.bfloat16, 3)
    k = weight((32, 128), torch.bfloat16, 2) * 7
    per_tensor = [generate_gparam(*torch.aminmax(t)) for t in (q, k, v)]
    shared = fp4.shared_global_scale([q, k, v])
    assert torch.equal(shared, torch.min(torch.cat(per_tensor)).reshape(1))  # update_fused_layer_weight_global_scales
    assert torch.equal(shared, per_tensor[1])
    for t in (q, k, v):
        assert torch.equal(fp4.fake_quant_weight_nvfp4(t, shared), ct_nvfp4(t, shared)[0])


def test_fused_experts_are_quantized_one_expert_at_a_time():
    w = weight((3, 24, 64), torch.bfloat16)
    w[1] *= 50
    gs = fp4.nvfp4_global_scale(w)
    assert gs.shape == (3,)
    nv, mx = fp4.fake_quant_weight_nvfp4(w), fp4.fake_quant_weight_mxfp4(w)
    for e in range(3):
        want, want_gs, _ = ct_nvfp4(w[e])
        assert torch.equal(gs[e:e + 1], want_gs)
        assert torch.equal(nv[e], want)
        assert torch.equal(mx[e], ct_mxfp4(w[e])[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_activations_equal_compressed_tensors(dtype):
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(2, 5, 64, generator=gen) * s).to(dtype) for s in (1.0, 3.0)]
    batches[1][0, 0, :16] = 0
    batches[1][1, 2, 3] = -40.0
    igs = fp4.calibrate_input_global_scale(batches)
    lo = torch.minimum(*[b.amin() for b in batches])
    hi = torch.maximum(*[b.amax() for b in batches])
    assert torch.equal(igs, generate_gparam(lo, hi))  # llm-compressor's static_minmax observer
    args = NVFP4["input_activations"]
    for x in batches:
        scale, zp = compute_dynamic_scales_and_zp(x, args, torch.nn.Module(), global_scale=igs)
        want = ct_forward.fake_quantize(x, scale, zp, args, global_scale=igs)
        got = fp4.fake_quant_act_nvfp4(x, igs)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_activations_equal_compressed_tensors(dtype):
    x = (torch.randn(3, 4, 96, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    x[0, 0, :32] = 0
    x[1, 1, 40] = 7.0  # 1.75 x 4: exponent 1
    args = MXFP4["input_activations"]
    scale, zp = compute_dynamic_scales_and_zp(x, args, torch.nn.Module())
    want = ct_forward.fake_quantize(x, scale, zp, args)
    got = fp4.fake_quant_act_mxfp4(x)
    assert got.dtype == dtype and torch.equal(got, want) and not torch.equal(got, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_weight_equals_compressed_tensors(dtype):
    w = weight((40, 128), dtype)
    w[6, :32] = torch.linspace(-7.0, 7.0, 32)  # group max 7 = 1.75 x 4: rounded up to 8, exponent 1
    got = fp4.fake_quant_weight_mxfp4(w)
    want, scale = ct_mxfp4(w)
    assert got.dtype == dtype and torch.equal(got, want)
    stored = fp4.pack_fp4(w, MXFP4_A16)["weight_scale"]  # E8M0: biased exponents
    assert torch.equal(torch.pow(2.0, stored.double() - 127), scale.double())
    assert torch.equal(got[5, :16], nearest_e2m1(w[5, :16] / 0.125) * 0.125)


def test_mxfp4_exponents():
    amax = torch.tensor([6.0, 7.0, 1.0, 1.7, 0.875, 0.0, 1e-30, 1e-38, 448.0])
    g = torch.zeros(9, 32)
    g[:, 3] = -amax
    # floor(log2(amax)) - 2, one more when amax's mantissa is >= 1.75; zero (and underflow) at the E8M0 floor -127
    want = [0, 1, -2, -2, -2, -127, -102, -127, 7]
    assert fp4.mxfp4_exponents(g).flatten().tolist() == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", [NVFP4_A16, NVFP4_W4A4, MXFP4_A16, MXFP4_W4A4], ids=lambda s: s.name)
def test_packed_decompresses_to_the_fake_quantized_weight(scheme, dtype):
    w = weight((48, 128), dtype)
    gs = torch.tensor([0.75]) * fp4.nvfp4_global_scale(w)  # as if shared with a larger sibling
    igs = torch.tensor([123.5])
    nv = scheme.w_type == "nvfp4"
    packed = fp4.pack_fp4(w, scheme, gs if nv else None, igs if scheme.a_bit and nv else None)
    group = 16 if nv else 32
    expect = {"weight_packed": (torch.uint8, (48, 64)),
              "weight_scale": (torch.float8_e4m3fn if nv else torch.uint8, (48, 128 // group))}
    if nv:
        expect["weight_global_scale"] = (torch.float32, (1,))
        assert torch.equal(packed["weight_global_scale"], gs)
    if scheme.a_bit and nv:
        expect["input_global_scale"] = (torch.float32, (1,))
        assert torch.equal(packed["input_global_scale"], igs)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in packed.items()} == expect
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    back = compressor.decompress(dict(packed), fp4.ct_fp4_scheme(scheme))["weight"]
    fake = fp4.fake_quant_fp4(w, scheme, gs if nv else None)
    assert back.dtype == torch.bfloat16  # compressed-tensors decompresses FP4 to bf16
    assert torch.equal(back, fake.to(torch.bfloat16))


def test_packed_nibbles_low_first_sign_bit_3():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([6.0, -0.5, 1.0])  # group max 6: MXFP4 scale 1, the codes are the values
    packed = fp4.pack_fp4(w, MXFP4_A16)
    assert packed["weight_packed"][0, :2].tolist() == [7 | (8 | 1) << 4, 2]
    assert packed["weight_scale"][0].tolist() == [127]


def test_pack_errors():
    with pytest.raises(VlmquantError, match="input_global_scale"):
        fp4.pack_fp4(torch.randn(4, 32), NVFP4_W4A4)
    with pytest.raises(VlmquantError, match="one expert at a time"):
        fp4.pack_fp4(torch.randn(2, 4, 32), NVFP4_A16)
    with pytest.raises(VlmquantError, match="multiple of the FP4 group size 16"):
        fp4.fake_quant_weight_nvfp4(torch.randn(4, 24))
    with pytest.raises(VlmquantError, match="not 2-D"):
        fp4.fake_quant_weight_mxfp4(torch.randn(32))
    with pytest.raises(VlmquantError, match="not an FP4 scheme"):
        fp4.pack_fp4(torch.randn(4, 32), Scheme(4, 16, True))
    with pytest.raises(VlmquantError, match="no activations"):
        fp4.calibrate_input_global_scale([])


def test_fp4_schemes():
    fp4_schemes = (NVFP4_W4A4, NVFP4_A16, MXFP4_W4A4, MXFP4_A16)
    assert [(s.name, s.format, s.experimental) for s in fp4_schemes] == [
        ("nvfp4", NVFP4_PACK_QUANTIZED, False), ("nvfp4a16", NVFP4_PACK_QUANTIZED, False),
        ("mxfp4", MXFP4_PACK_QUANTIZED, False), ("mxfp4a16", MXFP4_PACK_QUANTIZED, False)]
    for s in fp4_schemes:
        check_scheme(s)
        ct = fp4.ct_fp4_scheme(s)
        assert ct.format == s.format and ct.weights.group_size == (16 if s.w_type == "nvfp4" else 32)
        assert (ct.input_activations is not None) == (s.a_bit is not None)
        if s.a_bit:
            assert ct.input_activations.group_size == ct.weights.group_size
    bad = [Scheme(4, 128, True, "nvfp4"), Scheme(4, 16, False, "nvfp4"), Scheme(8, 16, True, "nvfp4"),
           Scheme(4, 16, True, "mxfp4"), Scheme(4, 32, True, "mxfp4", 8, "float"), Scheme(4, 16, True, "nvfp4", 8),
           Scheme(4, 16, True, "nvfp4", 4, "int"), Scheme(4, 16, True, "fp4")]
    for s in bad:
        with pytest.raises(VlmquantError, match="scheme w_bit="):
            check_scheme(s)
