"""FP4 (E2M1) fake quantization and packing: NVFP4 and MXFP4 (issue 27).

Formats (values are E2M1: 1 sign, 2 exponent, 1 mantissa bit; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}):

    NVFP4  groups of 16 along the input dim; one FP8 E4M3 scale per group; one FP32 global scale per
           tensor (NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision Inference", 2025:
           the E4M3 group scales are themselves scaled by a per-tensor FP32 factor).
           value = code x group_scale / global_scale.
    MXFP4  groups of 32 along the input dim; one E8M0 scale per group (a power of two, stored as its
           biased exponent, bias 127); no global scale (OCP Microscaling Formats (MX) Specification v1.0:
           the MXFP4 concrete format and its conversion of a vector to MX). value = code x 2^(e - 127).

The scale math is compressed-tensors' (0.20.1, quantization/utils/helpers.py and mxfp_utils.py), fed
the way llm-compressor's min-max observer feeds it (statistics in the tensor's own dtype):

    NVFP4 global scale  gs = 448 x 6 / amax(|W|), the division in W's dtype (generate_gparam), then FP32;
                        an all-zero tensor (inf) gives 1.0. Fused q/k/v and gate/up share the smallest of
                        their global scales (llm-compressor's update_fused_layer_weight_global_scales).
    NVFP4 group scale   s = e4m3(gs x (amax_group / 6)), amax_group / 6 in W's dtype, the product in FP32,
                        clamped to ±448 and rounded to E4M3; s = 0 becomes 0.125 (calculate_qparams).
    MXFP4 group scale   2^X with X = floor(log2(amax_group)) - 2, where amax_group is first rounded up to
                        the next power of two when its mantissa is >= 1.75 (round_to_power_2 with E2M1's
                        mantissa width); biased X + 127 clamped to [0, 255]. The OCP spec takes
                        floor(log2(amax)) - 2 without that rounding (and clamps the group's top to ±6);
                        we follow compressed-tensors, which is what serving engines are given.
    codes               e2m1(clamp(W / (s / gs), -6, 6)), in FP32, round to nearest, ties to even.

Weights are (out, in) or fused experts (E, out, in), each expert its own tensor (its own global scale).
bf16/fp16 inputs are quantized in FP32 and the result cast back to their dtype; results are bit for bit
compressed-tensors' quantize -> dequantize (tests/test_fp4.py). Device-agnostic.
"""
import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.scheme import FP4_GROUP, Scheme, check_scheme

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_GROUP, MXFP4_GROUP = 16, 32
E4M3_ZERO_SCALE = 0.125  # compressed-tensors' replacement for a group scale that rounds to 0


def round_e2m1_(t: torch.Tensor) -> torch.Tensor:
    """In place: clamp t to ±6 and round every value to the nearest E2M1 value, ties to even (the grid
    {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}: steps of 0.5 below 2, 1 below 4, 2 up to 6). t is float."""
    t.clamp_(-E2M1_MAX, E2M1_MAX)
    mag = t.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(t.dtype)
    return t.div_(step).round_().mul_(step)


def _groups(t: torch.Tensor, group: int, what: str) -> torch.Tensor:
    if t.shape[-1] % group:
        raise VlmquantError(f"{what} of shape {tuple(t.shape)}: its last dim is not a multiple of the FP4 group "
                            f"size {group}; leave this linear unquantized (export.ignore)")
    return t.unflatten(-1, (-1, group))  # (..., n_groups, group)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() not in (2, 3):
        raise VlmquantError(f"weight of shape {tuple(w.shape)} is not 2-D (out, in) or fused experts (E, out, in); "
                            "only linear weights can be quantized")


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale(s) 448 x 6 / amax, the division in amax's dtype (as compressed-tensors'
    generate_gparam computes it from an observer's statistics), returned in FP32, same shape;
    amax 0 (or NaN) gives 1.0 (no global scaling)."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    return torch.nan_to_num((E4M3_MAX * E2M1_MAX) / amax, nan=1.0, posinf=1.0, neginf=1.0).float()


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """FP32 global scale of a weight: (1,) for (out, in), (E,) for fused experts (E, out, in)."""
    _check_weight(w)
    amax = w.detach().abs().amax(dim=(-2, -1)).reshape(-1)  # in w's dtype
    return global_scale_from_amax(amax)


def shared_global_scale(weights) -> torch.Tensor:
    """One global scale for weights a serving engine fuses into one layer (q/k/v, gate/up): the smallest
    of their own (llm-compressor's update_fused_layer_weight_global_scales; vLLM needs them equal).
    weights: same-rank (out_i, in) or (E, out_i, in) tensors; returns (1,) or (E,) FP32."""
    return torch.stack([nvfp4_global_scale(w) for w in weights]).amin(dim=0)


def nvfp4_group_scales(g: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 group scales (..., n_groups, 1) in FP32 of groups g (..., n_groups, 16) in their own dtype;
    global_scale FP32, broadcastable to (..., n_groups, 1)."""
    local = g.abs().amax(dim=-1, keepdim=True) / E2M1_MAX  # in g's dtype, as calculate_qparams
    s = (global_scale * local).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return s.masked_fill_(s == 0, E4M3_ZERO_SCALE)


def _nvfp4(t: torch.Tensor, global_scale: torch.Tensor, what: str):
    """(codes (..., n_groups, 16) FP32 E2M1 values, group scales (..., n_groups, 1) FP32, effective scales
    s / gs) of t (..., C); global_scale FP32 of shape t.shape[:-2] (or (1,) / ())."""
    g = _groups(t.detach(), NVFP4_GROUP, what)
    gs = global_scale.float().reshape(global_scale.shape + (1,) * (g.dim() - global_scale.dim()))  # (E, 1, 1, 1)
    scale = nvfp4_group_scales(g, gs)
    eff = scale / gs
    codes = round_e2m1_(g.to(torch.float32, copy=True).div_(eff))
    return codes, scale, eff


def fake_quant_weight_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 fake quant of a (out, in) weight or fused experts (E, out, in): codes x s / gs in FP32, cast to
    w's dtype (same shape). global_scale: FP32 (1,) or (E,) to share one across fused linears
    (shared_global_scale); None: the weight's own (nvfp4_global_scale).
    Raises VlmquantError unless w is 2-D/3-D with an input width divisible by 16."""
    _check_weight(w)
    gs = nvfp4_global_scale(w) if global_scale is None else global_scale
    codes, _, eff = _nvfp4(w, gs, "weight")
    return codes.mul_(eff).flatten(-2).to(w.dtype)


def fake_quant_act_nvfp4(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quant of activations x (..., C) as W4A4 serving does: dynamic E4M3 scales per token and
    group of 16 channels against a static FP32 global input scale (1,) (calibrate_input_global_scale);
    FP32 math, returned in x's dtype."""
    codes, _, eff = _nvfp4(x, input_global_scale.reshape(()), "activations")
    return codes.mul_(eff).flatten(-2).to(x.dtype)


@torch.no_grad()
def calibrate_input_global_scale(batches) -> torch.Tensor:
    """Static NVFP4 global input scale (1,) FP32 from calibration activations (an iterable of (..., C)
    tensors, one linear's inputs): 448 x 6 / the largest |x| seen (llm-compressor's static_minmax observer
    followed by generate_gparam), the division in the activations' dtype."""
    amax = None
    for x in batches:
        m = x.detach().abs().amax()
        amax = m if amax is None else torch.maximum(amax, m.to(amax.device))
    if amax is None:
        raise VlmquantError("calibrate_input_global_scale: no activations were given; run calibration first")
    return global_scale_from_amax(amax.reshape(1))


def input_global_scale(x_absmax: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Static NVFP4 global input scale (1,) FP32 of a linear from the per-channel maxima x_absmax (C,) of its
    calibration inputs (over the valid tokens), those inputs divided by scales s (C,) folded into the previous op
    (None: none): 448 x 6 / max_c(x_absmax_c / s_c), in FP32 (as calibrate_input_global_scale on x / s)."""
    amax = x_absmax.float() if s is None else x_absmax.float() / s.float()
    return global_scale_from_amax(amax.amax().reshape(1))


def input_global_scales(amax: dict, names, source: str) -> dict:
    """{name: static NVFP4 global input scale (a float, FP32-exact)} of the linears `names` from {name: amax of its
    scaled calibration input} (a scale cache's meta "input_amax", search.act_scales). Raises VlmquantError naming
    `source` and the first linear without one."""
    missing = [n for n in names if n not in amax]
    if missing:
        raise VlmquantError(f"{source}: no calibrated input amax for {missing[0]} ({len(missing)} linears); NVFP4 W4A4 "
                            "needs the run's own search (rerun it)")
    return {n: float(global_scale_from_amax(torch.tensor([amax[n]], dtype=torch.float32))) for n in names}


def mxfp4_exponents(g: torch.Tensor) -> torch.Tensor:
    """Unbiased E8M0 exponents X (..., n_groups, 1), int32 in [-127, 128], of groups g (..., n_groups, 32):
    the group scale is 2^X (see the module doc for the rounding)."""
    amax = g.abs().amax(dim=-1, keepdim=True).float()
    mantissa, exp = torch.frexp(amax)  # amax = mantissa x 2^exp, mantissa in [0.5, 1)
    e = exp - 1 + (mantissa >= 0.875).int()  # floor(log2), +1 when the mantissa of amax is >= 1.75
    e = torch.where(amax == 0, torch.full_like(e, -1000), e)
    return (e - 2).clamp_(-127, 128)


def _mxfp4(t: torch.Tensor, what: str = "weight"):
    """(codes (..., n_groups, 32) FP32 E2M1 values, scales 2^X (..., n_groups, 1) FP32, X int32) of t (..., C)."""
    g = _groups(t.detach(), MXFP4_GROUP, what)
    x = mxfp4_exponents(g)
    # 2^X from its FP32 bits, exact on every device (2^-127 is the subnormal 1 << 22)
    scale = torch.where(x > -127, (x + 127) << 23, 1 << 22).view(torch.float32)
    return round_e2m1_(g.to(torch.float32, copy=True).div_(scale)), scale, x


def fake_quant_weight_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """MXFP4 fake quant of a (out, in) weight or fused experts (E, out, in): codes x 2^X in FP32, cast to w's
    dtype (same shape). Raises VlmquantError unless w is 2-D/3-D with an input width divisible by 32."""
    _check_weight(w)
    codes, scale, _ = _mxfp4(w)
    return codes.mul_(scale).flatten(-2).to(w.dtype)


def fake_quant_act_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 fake quant of activations x (..., C) as MXFP4 W4A4 serving does: dynamic E8M0 scales per token and
    group of 32 channels, no global scale; FP32 math, returned in x's dtype."""
    codes, scale, _ = _mxfp4(x, "activations")
    return codes.mul_(scale).flatten(-2).to(x.dtype)


def fake_quant_fp4(w: torch.Tensor, scheme: Scheme, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo-quantized weight of an FP4 scheme (w_type "nvfp4" or "mxfp4"); global_scale: NVFP4 only."""
    if scheme.w_type == "mxfp4":
        return fake_quant_weight_mxfp4(w)
    return fake_quant_weight_nvfp4(w, global_scale)


def ct_fp4_scheme(scheme: Scheme):
    """compressed-tensors' QuantizationScheme (targets ["Linear"]) of an FP4 scheme: its presets NVFP4
    (W4A4), NVFP4A16, MXFP4 (W4A4) or MXFP4A16, with the scheme's format."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if scheme.w_type not in FP4_GROUP:
        raise VlmquantError(f"scheme {scheme.name} is not an FP4 scheme (w_type nvfp4 or mxfp4)")
    check_scheme(scheme)
    preset = scheme.name.upper()  # NVFP4, NVFP4A16, MXFP4, MXFP4A16
    return QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset], format=scheme.format)


@torch.no_grad()
def pack_fp4(w: torch.Tensor, scheme: Scheme, global_scale: torch.Tensor | None = None,
             input_global_scale: torch.Tensor | None = None) -> dict:
    """The compressed-tensors parameters of one linear's (out, in) weight (call it per expert, w[e] with
    global_scale[e:e+1], for fused experts), packed by compressed-tensors' own compressor of the scheme's
    format (NVFP4PackedCompressor / MXFP4PackedCompressor):

        weight_packed        uint8 (out, in / 2), two E2M1 codes per byte, the lower nibble first
        weight_scale         float8_e4m3fn (out, in / 16) for NVFP4; uint8 E8M0 exponents (out, in / 32) MXFP4
        weight_global_scale  float32 (1,), NVFP4 only (the shared one for q/k/v and gate/up)
        input_global_scale   float32 (1,), NVFP4 W4A4 only (calibrate_input_global_scale; MXFP4 W4A4 has none)

    Decompressed by compressed-tensors they give fake_quant_fp4(w, scheme, global_scale) (in bf16, its
    decompression dtype). Raises VlmquantError for a non-FP4 scheme, a non-2-D weight, a width not divisible
    by the group, or a W4A4 scheme without input_global_scale.
    """
    from compressed_tensors.compressors import BaseCompressor

    ct = ct_fp4_scheme(scheme)
    if w.dim() != 2:
        raise VlmquantError(f"weight of shape {tuple(w.shape)} is not 2-D (out, in); pack fused experts one "
                            "expert at a time")
    state = {"weight": w.detach()}
    if scheme.w_type == "nvfp4":
        gs = (nvfp4_global_scale(w) if global_scale is None else global_scale).float().reshape(1).to(w.device)
        _, scale, _ = _nvfp4(w, gs, "weight")
        state.update(weight_scale=scale.squeeze(-1), weight_global_scale=gs)
        if scheme.a_bit is not None:
            if input_global_scale is None:
                raise VlmquantError(f"scheme {scheme.name}: pack_fp4 needs the linear's input_global_scale "
                                    "(calibrate_input_global_scale on its calibration inputs)")
            state["input_global_scale"] = input_global_scale.float().reshape(1).to(w.device)
    else:
        _, scale, _ = _mxfp4(w)
        state["weight_scale"] = scale.squeeze(-1)
    return BaseCompressor.get_value_from_registry(scheme.format).compress(state, ct)
