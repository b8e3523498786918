"""Fake FP8 (E4M3) quantization through torch's float8_e4m3fn dtype, for FP8 W8A8 runs.

- weights: symmetric, one scale per output channel, scale = absmax / 448 rounded to the weight's
  dtype (the dtype a checkpoint stores it in, see fake.round_scale_), q = fp8(clamp(w / scale));
- activations: symmetric, one scale per token, computed at run time in fp32 (not rounded), as
  vLLM's dynamic per-token FP8 and compressed-tensors' `float` / `token` / `dynamic` args do.

448 is the largest finite E4M3 value (torch.finfo(torch.float8_e4m3fn).max). Values are clamped
to ±448 before the cast (a rounded-down scale can push the row maximum just past it; E4M3 has no
infinity and the cast would give NaN). The 1e-5 absmax floor of the integer quantizers keeps
all-zero rows at zero.
"""
import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import compute_dtype, round_scale_

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def fp8_scales(t: torch.Tensor, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scale (..., 1) of every row (last dim) of t: max(absmax, 1e-5) / 448, rounded to `scale_dtype`."""
    lo, hi = torch.aminmax(t, dim=-1, keepdim=True)
    return round_scale_(torch.maximum(hi, lo.neg()).clamp_(min=1e-5).div_(FP8_MAX), scale_dtype)


def fp8_codes(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of t (..., C) for scales (..., 1): fp8(clamp(t / scale, -448, 448))."""
    return (t / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quant_fp8_rows_(t: torch.Tensor, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """In place: FP8 fake quant of every row (last dim) of t, t in the compute dtype."""
    scale = fp8_scales(t, scale_dtype)
    t.copy_(fp8_codes(t, scale)).mul_(scale)
    return t


def fake_quant_weight_fp8(w: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 fake quant of a (out, in) weight (or (E, out, in) experts), one scale per output row (rounded to
    w's dtype).

    Returns a new tensor of w's dtype and shape: fp8(clamp(w / scale)) * scale.
    """
    if w.dim() not in (2, 3):
        raise VlmquantError(f"weight of shape {tuple(w.shape)} is not 2-D (out, in) or fused experts (E, out, in); "
                            "only linear weights can be quantized")
    work = w.detach().to(compute_dtype(w.dtype), copy=True)
    return fake_quant_fp8_rows_(work, w.dtype).to(w.dtype)


def fake_quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 fake quant of activations (..., C), one fp32 scale per token (row of the last dim)."""
    work = x.detach().to(compute_dtype(x.dtype), copy=True)
    return fake_quant_fp8_rows_(work).to(x.dtype)
