"""Integer / FP8 codes of the packed schemes: they dequantize to the fake-quantized weight bit for bit."""
import pytest
import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.codes import quantize_weight
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import FLOAT_QUANTIZED, INT_QUANTIZED, PACK_QUANTIZED, Scheme, check_scheme
from vlmquant.quant.fp8 import FP8_MAX, fake_quant_act_fp8, fake_quant_weight_fp8, fp8_scales
from vlmquant.quant.model import quantize_linears
from vlmquant.spec import RunSpec

SCHEMES = [Scheme(4, 128), Scheme(4, 128, True), Scheme(4, -1), Scheme(4, -1, True), Scheme(8, 128), Scheme(8, -1, True),
           Scheme(3, 128), Scheme(3, -1, True), Scheme(8, -1, True, a_bit=8), Scheme(4, -1, True, a_bit=8),
           Scheme(8, -1, True, "float", 8, "float")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(dtype, seed=0, shape=(64, 256)):
    """Rows of very different ranges, some all-zero columns and an outlier, like folded decoder weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.05
    w[:, 5] = 0
    w[3, 7] = 1.5
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_codes_dequantize_to_the_fake_quantized_weight(scheme, dtype):
    for seed in range(2):
        w = weight(dtype, seed)
        q = quantize_weight(w, scheme)
        assert torch.equal(q.dequantize(dtype), quantizer(scheme).weight(w))
        groups = 256 // scheme.w_group if scheme.w_group > 0 else 1
        assert q.scale.shape == (64, groups) and q.scale.dtype == dtype and q.codes.shape == (64, 256)
        if scheme.w_type == "float":
            assert q.codes.dtype == torch.float8_e4m3fn and q.zero_point is None
            continue
        lo, hi = -(2 ** (scheme.w_bit - 1)), 2 ** (scheme.w_bit - 1) - 1
        assert q.codes.dtype == torch.int8 and lo <= q.codes.min() and q.codes.max() <= hi
        if scheme.symmetric:
            assert q.zero_point is None
        else:
            assert q.zero_point.shape == (64, groups) and q.zero_point.dtype == torch.int8
            assert lo <= q.zero_point.min() and q.zero_point.max() <= hi


def test_asymmetric_codes_hand_values():
    w = torch.tensor([[-0.3, 0.1, 0.9, 1.2]])
    # 4 bits, one group of 4: range 1.5 -> scale 0.1, zero round(3) = 3; q = -3+3, 1+3, 9+3, 12+3 = 0, 4, 12, 15;
    # stored signed: code = q - 8, zero_point = 3 - 8
    q = quantize_weight(w, Scheme(4, 4))
    assert q.codes.tolist() == [[-8, -4, 4, 7]] and q.zero_point.tolist() == [[-5]]
    torch.testing.assert_close(q.scale, torch.tensor([[0.1]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(q.dequantize(), torch.tensor([[-0.3, 0.1, 0.9, 1.2]]), rtol=0, atol=1e-6)


def test_a_bf16_scale_changes_the_codes_of_some_weights():
    """Codes from the unrounded fp32 scale would be one step off for a share of bf16 weights."""
    w = weight(torch.bfloat16, 1)
    q = quantize_weight(w, Scheme(4, 128))
    g = w.float().view(-1, 128)
    scale = ((g.amax(1, keepdim=True) - g.amin(1, keepdim=True)) / 15)  # not rounded to bf16
    zero = (-g.amin(1, keepdim=True) / scale).round().clamp(0, 15)
    naive = ((g / scale).round() + zero).clamp(0, 15) - 8
    off = (naive.view(64, 256) != q.codes.float()).float().mean().item()
    assert off > 0.01


def test_scheme_names_formats_and_refusals():
    assert Scheme(4, 128).name == "w4a16-asym-g128" and Scheme(4, 128).format == PACK_QUANTIZED
    assert Scheme(8, -1, True, a_bit=8).format == INT_QUANTIZED
    assert Scheme(4, -1, True, a_bit=8).format == PACK_QUANTIZED
    assert Scheme(8, -1, True, "float", 8, "float").format == FLOAT_QUANTIZED
    assert Scheme(3, 128).experimental and not Scheme(4, 128).experimental
    for bad in (dict(w_bit=2), dict(w_bit=6), dict(w_bit=8, a_bit=8), dict(w_bit=8, w_group=128, symmetric=True, a_bit=8),
                dict(w_bit=4, w_group=-1, symmetric=True, a_bit=4), dict(w_bit=8, w_group=-1, symmetric=True, w_type="float"),
                dict(w_bit=4, w_type="nf4")):
        with pytest.raises(VlmquantError, match="scheme"):
            check_scheme(Scheme(**bad))


@pytest.mark.parametrize("run", [{"w_bit": 3, "w_group": 128}, {"w_bit": 4, "w_group": 64}, {"w_bit": 4, "w_sym": True},
                                 {"w_bit": 8, "w_group": -1}, {"w_bit": 8, "a_bit": 8}, {"w_bit": 4, "a_bit": 8},
                                 {"w_bit": 8, "a_bit": 8, "w_type": "float"}], ids=str)
def test_the_run_scheme_is_what_the_pseudo_checkpoint_quantizes(run):
    """quant.model.quantize_linears (the pseudo export) and the packed codes agree for every packable run config."""
    spec = RunSpec.from_config("r", {"method": "rtn", **run})
    assert spec.packed_form() is None and "compressed-tensors" in spec.formats
    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(256, 64, bias=False).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(weight(dtype, 2))
        expected = quantize_weight(lin.weight, spec.scheme).dequantize(dtype)
        quantize_linears([("lin", lin)], spec)
        assert torch.equal(lin.weight, expected)


@pytest.mark.parametrize("run, packed", [({"w_bit": 2}, False), ({"w_bit": 4, "a_bit": 4}, False),
                                         ({"w_bit": 6, "w_group": -1}, False), ({"w_bit": 3}, True)], ids=str)
def test_formats_default_to_the_packed_form_where_there_is_one(run, packed):
    """export.formats (default: packed only) with the pseudo checkpoint in place of a packed form the scheme lacks."""
    spec = RunSpec.from_config("r", {"method": "rtn", **run})
    assert spec.formats == (("compressed-tensors",) if packed else ("pseudo",))
    both = RunSpec.from_config("r", {"method": "rtn", **run}, formats=("compressed-tensors", "pseudo"))
    assert both.formats == (("compressed-tensors", "pseudo") if packed else ("pseudo",))
    assert RunSpec.from_config("r", {"method": "rtn", **run, "formats": ["pseudo"]}, formats=("compressed-tensors",)
                               ).formats == ("pseudo",)  # the run's own formats win
    if not packed:
        with pytest.raises(VlmquantError, match="runs.r.formats: scheme"):
            RunSpec.from_config("r", {"method": "rtn", **run, "formats": ["compressed-tensors"]})


def test_bad_group_is_one_line():
    with pytest.raises(VlmquantError, match="groups of 128"):
        quantize_weight(torch.zeros(8, 100), Scheme(4, 128))


# ---- fake FP8 ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_weight_properties(dtype):
    w = weight(dtype, 3)
    q = fake_quant_weight_fp8(w)
    assert q.shape == w.shape and q.dtype == dtype
    wf, qf = w.float(), q.float()
    scale = (wf.abs().amax(1, keepdim=True) / FP8_MAX).to(dtype).float()
    # every value is an E4M3 number times its row's scale (in the weight's precision)
    assert torch.equal(q, ((wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(dtype))
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 above the subnormal range (2^-6 · scale)
    normal = (wf / scale).abs() >= 2**-6
    tol = 2**-4 + (2**-7 if dtype != torch.float32 else 0)  # plus the half-precision rounding of the result
    assert ((qf - wf).abs() <= tol * wf.abs())[normal].all()
    # the largest magnitude of a row lands on ±448 · scale, zeros stay zeros, and it is idempotent in fp32
    assert torch.all(q[:, 5] == 0)
    if dtype == torch.float32:
        torch.testing.assert_close(qf.abs().amax(1), wf.abs().amax(1), rtol=2**-4, atol=0)
        torch.testing.assert_close(fake_quant_weight_fp8(q), q, rtol=2**-20, atol=0)


def test_fp8_all_zero_rows_and_outliers_stay_finite():
    w = torch.zeros(3, 16)
    w[1] = torch.linspace(-1e4, 1e4, 16)
    q = fake_quant_weight_fp8(w)
    assert torch.isfinite(q).all() and torch.all(q[0] == 0) and torch.all(q[2] == 0)
    assert q[1].abs().max() == 1e4
    # a scale rounded down past the row maximum clamps to 448 instead of turning into NaN
    assert torch.isfinite(fake_quant_weight_fp8(torch.full((2, 8), 3.3e38))).all()


def test_fp8_activations_per_token_unrounded_scales():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 7, 64, generator=g) * torch.rand(2, 7, 1, generator=g) * 30).bfloat16()
    q = fake_quant_act_fp8(x)
    assert q.shape == x.shape and q.dtype == torch.bfloat16
    xf = x.float()
    scale = fp8_scales(xf.clone())  # fp32, per token, not rounded to bf16
    expected = ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).bfloat16()
    assert torch.equal(q, expected)
    for b in range(2):  # each token is quantized on its own
        for t in range(7):
            assert torch.equal(q[b, t], fake_quant_act_fp8(x[b, t:t + 1])[0])

