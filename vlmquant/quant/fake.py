"""Fake quantization (quantize, then dequantize back to floats).

- `fake_quant_weight`: asymmetric min/max with a zero point, in groups of input columns
  (weight-only W4/W3 runs); `fake_quant_weight_sym`: symmetric abs-max, no zero point, same groups.
- `fake_quant_weight_per_channel_sym` / `fake_quant_act_per_token`: symmetric abs-max per
  output row / per token (weight-activation W4A8/W8A8 runs).

Half-precision inputs are quantized in fp32 (round(w/scale) in bf16 is off by whole steps
near the top of the range) and cast back; fp32/fp64 inputs are quantized in their own dtype.
Weight quantizers round each scale to the weight's dtype before using it (asym_qparams, sym_qparams), so
the result is exactly (integer code - zero) x stored scale, as a packed checkpoint stores it
(vlmquant.quant.codes); for fp32/fp64 weights the rounding changes nothing.
The `..._` helpers work in place on a tensor already in the compute dtype, so the grid
search can reuse one buffer.
"""
import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantization math runs in for tensors of `dtype`."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_weight_groups(shape, group: int) -> int:
    """Return the group size for a (out, in) weight, or fused experts (E, out, in) quantized per expert like a
    stack of linears (`group <= 0`: the whole row)."""
    if len(shape) not in (2, 3):
        raise VlmquantError(f"weight of shape {tuple(shape)} is not 2-D (out, in) or fused experts (E, out, in); only "
                            "linear weights can be quantized")
    n_in = shape[-1]
    if group <= 0:
        return n_in
    if n_in % group:
        raise VlmquantError(
            f"weight of shape {tuple(shape)} cannot be split into groups of {group} along the input dim; "
            f"choose w_group dividing {n_in} (or -1 for one group per output row)"
        )
    return group


def check_bits(bits: int, low: int = 1) -> None:
    """Raise unless bits is an integer in [low, 16]."""
    if not isinstance(bits, int) or not low <= bits <= 16:
        raise VlmquantError(f"bits={bits!r} is not an integer in [{low}, 16]")


def round_scale_(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """In place: round `scale` to the nearest value of `scale_dtype` (the dtype it is stored in), keeping
    its own dtype. None, or a dtype at least as precise as the scale's: unchanged."""
    if scale_dtype is not None and torch.finfo(scale_dtype).bits < torch.finfo(scale.dtype).bits:
        scale.copy_(scale.to(scale_dtype))
    return scale


def asym_qparams(wg: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None):
    """(scale, zero) of asymmetric min/max quantization of every row of wg (n_groups, group), each (n_groups, 1).

    scale = max(max - min, 1e-5) / (2^bits - 1), rounded to `scale_dtype`; zero = clamp(round(-min/scale), 0,
    2^bits - 1), a whole number in wg's dtype. The one rule for fake quant and integer codes.
    """
    qmax = 2**bits - 1
    lo, hi = torch.aminmax(wg, dim=1, keepdim=True)  # (n_groups, 1) each
    scale = round_scale_((hi - lo).clamp_(min=1e-5).div_(qmax), scale_dtype)
    zero = (-lo / scale).round_().clamp_(0, qmax)
    return scale, zero


def sym_qparams(t: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scale (..., 1) of symmetric abs-max quantization of every row (last dim) of t:
    max(absmax, 1e-5) / (2^(bits-1) - 1), rounded to `scale_dtype`."""
    lo, hi = torch.aminmax(t, dim=-1, keepdim=True)
    absmax = torch.maximum(hi, lo.neg())  # (..., 1)
    return round_scale_(absmax.clamp_(min=1e-5).div_(2 ** (bits - 1) - 1), scale_dtype)


def fake_quant_groups_(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """In place: asymmetric min/max fake quant of a contiguous (..., out, in) tensor, groups along in
    (scales rounded to `scale_dtype`, see asym_qparams); (E, out, in) experts all in one op."""
    qmax = 2**bits - 1
    wg = w.view(-1, group)  # (out * in / group, group)
    scale, zero = asym_qparams(wg, bits, scale_dtype)
    # clamp(round(w/scale) + zero, 0, qmax) - zero, without two passes over w
    wg.div_(scale).round_().clamp_(-zero, qmax - zero).mul_(scale)
    return w


@cuda_compiled
def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Q(w·s)/s in w's dtype: the weight a scale search tries for per-input-channel scales s.

    w: (out, C_in), or fused experts (E, out, C_in) with s (C_in,) shared or (E, 1, C_in) per expert.
    Same math as fake_quant_groups_ on w·s, in the compute dtype (fused with VLMQUANT_COMPILE=1).
    """
    ws = w.to(compute_dtype(w.dtype)) * s  # (out, C_in), one fresh tensor; the rest is in place
    return fake_quant_groups_(ws, bits, group).div_(s).to(w.dtype)


def fake_quant_sym_rows_(t: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """In place: symmetric abs-max fake quant of every row (last dim) of t (scales rounded to
    `scale_dtype`, see sym_qparams)."""
    qpos = 2 ** (bits - 1) - 1
    scale = sym_qparams(t, bits, scale_dtype)
    t.div_(scale).round_().clamp_(-qpos - 1, qpos).mul_(scale)
    return t


def fake_quant_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min/max fake quant of a (out, in) weight (or (E, out, in) experts, each expert's rows alike)
    in groups of `group` input columns.

    Per group: scale = max(max - min, 1e-5) / (2^bits - 1) rounded to w's dtype, zero = clamp(round(-min/scale)),
    q = clamp(round(w/scale) + zero, 0, 2^bits - 1), out = (q - zero) * scale.
    `group <= 0` means one group per output row. Returns a new tensor of w's dtype and shape.
    """
    check_bits(bits, 1)
    group = check_weight_groups(w.shape, group)
    work = w.detach().to(compute_dtype(w.dtype), memory_format=torch.contiguous_format, copy=True)
    return fake_quant_groups_(work, bits, group, w.dtype).to(w.dtype)


def fake_quant_weight_sym(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric abs-max fake quant (no zero point) of a (out, in) weight (or (E, out, in) experts) in groups
    of `group` input columns.

    Per group: scale = max(absmax, 1e-5) / (2^(bits-1) - 1) rounded to w's dtype,
    out = clamp(round(w/scale), -2^(bits-1), 2^(bits-1) - 1) * scale. `group <= 0` means one group per
    output row (= fake_quant_weight_per_channel_sym). Returns a new tensor of w's dtype and shape.
    """
    check_bits(bits, 2)
    group = check_weight_groups(w.shape, group)
    work = w.detach().to(compute_dtype(w.dtype), memory_format=torch.contiguous_format, copy=True)
    fake_quant_sym_rows_(work.view(-1, group), bits, w.dtype)
    return work.to(w.dtype)


def fake_quant_weight_per_channel_sym(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric abs-max fake quant of a (out, in) weight, one scale per output row.

    scale = max(absmax, 1e-5) / (2^(bits-1) - 1) rounded to w's dtype,
    q = clamp(round(w/scale), -2^(bits-1), 2^(bits-1) - 1).
    """
    check_bits(bits, 2)
    if w.dim() != 2:
        raise VlmquantError(f"weight of shape {tuple(w.shape)} is not 2-D (out, in); only linear weights can be quantized")
    work = w.detach().to(compute_dtype(w.dtype), copy=True)
    return fake_quant_sym_rows_(work, bits, w.dtype).to(w.dtype)


def fake_quant_act_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric abs-max fake quant of activations (..., C), one scale per token (row of the last dim)."""
    check_bits(bits, 2)
    work = x.detach().to(compute_dtype(x.dtype), copy=True)
    return fake_quant_sym_rows_(work, bits).to(x.dtype)
