"""Quantization schemes with a packed form, and the integer (or FP8) codes of a weight.

A `Scheme` says how every quantized decoder linear of a run is stored and served:

    name       weights                                 activations            compressed-tensors format
    w4a16      int4, asym (zero point) or sym, g128/ch  -                      pack-quantized
    w8a16      int8, asym or sym, g128/ch               -                      pack-quantized
    w3a16      int3, asym or sym, g128/ch (experimental) -                     pack-quantized
    w8a8       int8, sym, per channel                   int8 per token, dyn.   int-quantized
    w4a8       int4, sym, per channel                   int8 per token, dyn.   pack-quantized
    fp8        E4M3, sym, per channel                   E4M3 per token, dyn.   float-quantized

`quantize_weight(w, scheme)` returns codes, scales and zero points such that
`dequantize()` equals `quantizer(scheme).weight(w)` (the pseudo-quantized weight, quant/quantizer.py) bit for bit, in fp32,
fp16 and bf16: both come from the same scale rule (fake.asym_qparams / sym_qparams /
fp8.fp8_scales, the scale rounded to the weight's dtype before any code is computed) and the
same fp32 arithmetic; (code - zero) x scale is exact in fp32 and rounds once to the weight's dtype.

Codes follow compressed-tensors' signed convention: an asymmetric b-bit weight stores
code = q - 2^(b-1) and zero_point = zero - 2^(b-1) (q, zero in [0, 2^b - 1] as fake_quant_weight
computes them), so value = (code - zero_point) x scale either way.
"""
from dataclasses import dataclass

import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import asym_qparams, check_weight_groups, compute_dtype, sym_qparams
from vlmquant.quant.fp8 import fp8_codes, fp8_scales
from vlmquant.quant.scheme import FP4_GROUP, Scheme, check_scheme


@dataclass
class QuantizedWeight:
    """codes (out, in): int8 (signed, see the module doc) or float8_e4m3fn; scale (out, n_groups) in the
    weight's dtype; zero_point (out, n_groups) int8, None for symmetric schemes; group: input columns per scale."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zero_point) x scale, computed in fp32 (exact) and cast to `dtype`; (out, in)."""
        q = self.codes.float()
        if self.zero_point is not None:
            q = q - self.zero_point.float().repeat_interleave(self.group, dim=1)
        return (q * self.scale.float().repeat_interleave(self.group, dim=1)).to(dtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Codes, scales and zero points of a (out, in) weight; `.dequantize(w.dtype)` == quantizer(scheme).weight(w).

    Raises VlmquantError when the scheme has no packed form, the weight is not 2-D or w_group does not
    divide its input width.
    """
    check_scheme(scheme)
    if scheme.w_type in FP4_GROUP:
        raise VlmquantError(f"scheme {scheme.name}: FP4 codes and scales are packed by quant.fp4.pack_fp4")
    if w.dim() != 2:
        raise VlmquantError(f"weight of shape {tuple(w.shape)} is not 2-D (out, in); packed codes are written for "
                            "linear weights only")
    group = check_weight_groups(tuple(w.shape), scheme.w_group)
    n_out = w.shape[0]
    work = w.detach().to(compute_dtype(w.dtype), memory_format=torch.contiguous_format, copy=True)
    wg = work.view(-1, group)  # (out * n_groups, group)
    zero_point = None
    if scheme.w_type == "float":
        scale = fp8_scales(wg, w.dtype)
        codes = fp8_codes(wg, scale)
    elif scheme.symmetric:
        half = 2 ** (scheme.w_bit - 1)
        scale = sym_qparams(wg, scheme.w_bit, w.dtype)
        codes = wg.div_(scale).round_().clamp_(-half, half - 1).to(torch.int8)
    else:
        qmax, half = 2**scheme.w_bit - 1, 2 ** (scheme.w_bit - 1)
        scale, zero = asym_qparams(wg, scheme.w_bit, w.dtype)
        # the same ops as fake_quant_groups_: q - zero = clamp(round(w/scale), -zero, qmax - zero)
        codes = wg.div_(scale).round_().clamp_(-zero, qmax - zero).add_(zero - half).to(torch.int8)
        zero_point = (zero - half).to(torch.int8).view(n_out, -1)
    return QuantizedWeight(codes.view(n_out, -1), scale.view(n_out, -1).to(w.dtype), zero_point, group)
