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
`dequantize()` equals `fake_quant(w, scheme)` (the pseudo-quantized weight) bit for bit, in fp32,
fp16 and bf16: both come from the same scale rule (fake.asym_qparams / sym_qparams /
fp8.fp8_scales, the scale rounded to the weight's dtype before any code is computed) and the
same fp32 arithmetic; (code - zero) x scale is exact in fp32 and rounds once to the weight's dtype.

Codes follow compressed-tensors' signed convention: an asymmetric b-bit weight stores
code = q - 2^(b-1) and zero_point = zero - 2^(b-1) (q, zero in [0, 2^b - 1] as fake_quant_weight
computes them), so value = (code - zero_point) x scale either way.
"""
from dataclasses import dataclass

import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import (asym_qparams, check_bits, check_weight_groups, compute_dtype, fake_quant_act_per_token,
                                 fake_quant_sym_rows_, fake_quant_weight, fake_quant_weight_sym, sym_qparams)
from vlmquant.quant.fp8 import fake_quant_act_fp8, fake_quant_fp8_rows_, fake_quant_weight_fp8, fp8_codes, fp8_scales

PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED = "pack-quantized", "int-quantized", "float-quantized"


@dataclass(frozen=True)
class Scheme:
    """How a run's quantized linears are stored.

    w_bit: weight bits; w_group: > 0 groups of that many input columns, <= 0 one group per output
    channel; symmetric: no zero point; w_type: "int" or "float" (FP8 E4M3, w_bit 8); a_bit/a_type:
    dynamic per-token activation quantization at serving time (None: weight-only). Any scheme can be
    fake-quantized (`fake_quant`); `check_scheme` says which have a packed form.
    """
    w_bit: int
    w_group: int = 128
    symmetric: bool = False
    w_type: str = "int"
    a_bit: int | None = None
    a_type: str = "int"

    @property
    def name(self) -> str:
        if self.w_type == "float":
            return "fp8"
        weights = f"w{self.w_bit}" + ("a16" if self.a_bit is None else f"a{self.a_bit}")
        group = f"g{self.w_group}" if self.w_group > 0 else "ch"
        return f"{weights}-{'sym' if self.symmetric else 'asym'}-{group}"

    @property
    def format(self) -> str:
        """The compressed-tensors format its quantized linears are written in."""
        if self.w_type == "float":
            return FLOAT_QUANTIZED
        return INT_QUANTIZED if self.a_bit == 8 and self.w_bit == 8 else PACK_QUANTIZED

    @property
    def experimental(self) -> bool:
        """Packed forms that serving engines do not run everywhere (vLLM: 3-bit only through one CUDA kernel family)."""
        return self.w_type == "int" and self.w_bit == 3


def check_scheme(s: Scheme) -> None:
    """Raise a one-line VlmquantError unless `s` is one of the packed forms above."""
    what = f"scheme w_bit={s.w_bit} w_group={s.w_group} symmetric={s.symmetric} w_type={s.w_type} a_bit={s.a_bit}"
    if s.w_type == "float":
        if not (s.w_bit == 8 and s.a_bit == 8 and s.a_type == "float" and s.symmetric and s.w_group <= 0):
            raise VlmquantError(f"{what}: FP8 is E4M3 weights per channel (w_bit 8, symmetric, w_group -1) with "
                                "FP8 per-token activations (a_bit 8, a_type float)")
        return
    if s.w_type != "int" or s.a_type != "int":
        raise VlmquantError(f"{what}: w_type/a_type must be 'int' or 'float'")
    if s.a_bit is None:
        if s.w_bit not in (3, 4, 8):
            raise VlmquantError(f"{what}: weight-only packed export supports w_bit 3 (experimental), 4 or 8; "
                                "export other widths as pseudo")
        return
    if s.a_bit != 8 or s.w_bit not in (4, 8) or not s.symmetric or s.w_group > 0:
        raise VlmquantError(f"{what}: weight-activation packed export supports W8A8 and W4A8: symmetric int weights "
                            "per channel (w_group -1) with int8 per-token activations")


def fake_quant(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The pseudo-quantized weight of a (out, in) weight under `scheme`, in w's dtype."""
    if scheme.w_type == "float":
        return fake_quant_weight_fp8(w)
    if scheme.symmetric:
        return fake_quant_weight_sym(w, scheme.w_bit, scheme.w_group)
    return fake_quant_weight(w, scheme.w_bit, scheme.w_group)


def fake_quant_act(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The activations (..., C) as a weight-activation scheme's serving engine quantizes them: per token,
    symmetric int `a_bit` or FP8 (a_type float)."""
    return fake_quant_act_fp8(x) if scheme.a_type == "float" else fake_quant_act_per_token(x, scheme.a_bit)


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
    """Codes, scales and zero points of a (out, in) weight; `.dequantize(w.dtype)` == fake_quant(w, scheme).

    Raises VlmquantError when the scheme has no packed form, the weight is not 2-D or w_group does not
    divide its input width.
    """
    check_scheme(scheme)
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


@cuda_compiled
def scaled_act_quant(x: torch.Tensor, s: torch.Tensor | None, bits: int, fp8: bool) -> torch.Tensor:
    """Q_a(x/s)·s per token (rows of the last dim) in x's dtype: symmetric `bits`-bit integers or FP8 E4M3,
    computed in fp32; s (C,) or None (no scales). One fused kernel with VLMQUANT_COMPILE=1 on CUDA."""
    work = x.to(compute_dtype(x.dtype), copy=True)
    if s is not None:
        work = work.div_(s)
    q = fake_quant_fp8_rows_(work) if fp8 else fake_quant_sym_rows_(work, bits)
    if s is not None:
        q = q.mul_(s)
    return q.to(x.dtype)


class InputQuantizer:
    """Forward pre-hook that fake-quantizes a linear's input per token as a weight-activation scheme does
    (symmetric `a_bit` integers, or FP8 E4M3 for a_type "float"), as the scaled model sees it,
    Q_a(x/s)·s, when `s` (C_in,) is set. Linears that share one input tensor (q/k/v, gate/up) quantize it
    once: the result is kept for that tensor, its version and `s`, until `reset()`."""

    def __init__(self, scheme: Scheme):
        self.fp8 = scheme.a_type == "float"
        if not self.fp8:
            check_bits(scheme.a_bit, 2)
        self.bits, self.s, self.last = scheme.a_bit, None, {}

    def __call__(self, module, args):
        x, last = args[0], self.last
        if last.get("x") is not x or last["version"] != x._version or last["s"] is not self.s:
            q = scaled_act_quant(x.detach(), self.s, self.bits, self.fp8)
            self.last = {"x": x, "version": x._version, "s": self.s, "q": q}
        return (self.last["q"], *args[1:])

    def reset(self):
        self.last = {}
