"""The one entry point to fake quantization: `quantizer(scheme)` gives a scheme's weight and activation
quantizers, and every caller (the scale search, the pseudo checkpoint, run-time activation quantization,
eval) goes through it.

A new number format is one function in quant/ (its fake quantizer of a weight, and of activations per token
if it has them) plus its branch in `quantizer` below.

    weight(w)            the fake-quantized weight, what the pseudo checkpoint stores
    scaled_weight(w, s)  Q(w·s)/s, the weight a scale search tries for per-input-channel scales s
    weights(ws)          the weights a serving engine fuses into one layer (q/k/v, gate/up: quant.scheme.fused_sets),
                         quantized together: NVFP4 gives them one global scale, other formats quantize each alone
    scaled_weights(ws, s)  the same for Q(w·s)/s
    act(x, s=None, global_scale=None)  Q_a(x/s)·s per token, as the scaled model's serving engine quantizes its
                         inputs; NVFP4 W4A4 needs the linear's static global input scale (fp4.input_global_scale)
"""
from dataclasses import dataclass
from typing import Callable

import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import (check_bits, check_weight_groups, compute_dtype, fake_quant_sym_rows_,
                                 fake_quant_weight, fake_quant_weight_sym, scaled_fake_quant)
from vlmquant.quant.fp4 import (fake_quant_act_nvfp4, fake_quant_weight_mxfp4, fake_quant_weight_nvfp4,
                                shared_global_scale)
from vlmquant.quant.fp8 import fake_quant_fp8_rows_, fake_quant_weight_fp8
from vlmquant.quant.scheme import FP4_GROUP, Scheme, check_scheme


@dataclass(frozen=True)
class Quantizer:
    """The fake quantizers of one scheme (see the module doc). Each returns a new tensor of its input's dtype.

    weight: (out, in) weight, or fused experts (E, out, in) each expert like a linear → same shape.
    scaled_weight: (w, s) with s (C_in,), or (E, 1, C_in) per expert → Q(w·s)/s, quantized in the compute
    dtype (fake.compute_dtype) and cast back once. act: (x (..., C), s (C,) or None, global_scale FP32 (1,) or
    None) → Q_a(x/s)·s; None for weight-only schemes.
    """
    scheme: Scheme
    weight: Callable[[torch.Tensor], torch.Tensor]
    scaled_weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    act: Callable | None = None

    def weights(self, ws: list) -> list:
        """The fake-quantized weights of linears a serving engine fuses into one layer (same rank, same input
        width): under NVFP4 with one global scale, the smallest of theirs (fp4.shared_global_scale), as the packed
        checkpoint stores it; under other formats each alone (= [weight(w) for w in ws])."""
        if self.scheme.w_type != "nvfp4" or len(ws) == 1:
            return [self.weight(w) for w in ws]
        gs = shared_global_scale(ws)
        return [fake_quant_weight_nvfp4(w, gs) for w in ws]

    def scaled_weights(self, ws: list, s: torch.Tensor) -> list:
        """Q(w·s)/s of fused linears sharing the input scales s (C_in,): `weights` of the scaled weights."""
        if self.scheme.w_type != "nvfp4" or len(ws) == 1:
            return [self.scaled_weight(w, s) for w in ws]
        scaled = [w.to(compute_dtype(w.dtype)) * s for w in ws]
        return [q.div_(s).to(w.dtype) for q, w in zip(self.weights(scaled), ws)]


def quantizer(scheme: Scheme) -> Quantizer:
    """The fake quantizers of `scheme`. Raises VlmquantError for bit widths out of range (integer weights: at
    least 1 bit asymmetric, 2 symmetric; integer activations at least 2) and FP4 schemes that are not NVFP4 /
    MXFP4 (quant.scheme.check_fp4)."""
    if scheme.w_type in FP4_GROUP:
        return fp4_quantizer(scheme)
    bits, group = scheme.w_bit, scheme.w_group
    if scheme.w_type == "float":  # FP8 E4M3, per output channel

        def weight(w):
            return fake_quant_weight_fp8(w)
    elif scheme.symmetric:
        check_bits(bits, 2)

        def weight(w):
            return fake_quant_weight_sym(w, bits, group)
    else:
        check_bits(bits, 1)

        def weight(w):
            return fake_quant_weight(w, bits, group)

    if scheme.w_type == "int" and not scheme.symmetric:  # the weight-only hot path: one fused kernel (compile.py)

        def scaled_weight(w, s):
            return scaled_fake_quant(w, s, bits, check_weight_groups(tuple(w.shape), group))
    else:

        def scaled_weight(w, s):
            return weight(w.to(compute_dtype(w.dtype)) * s).div_(s).to(w.dtype)

    act = None
    if scheme.a_bit is not None:
        fp8 = scheme.a_type == "float"
        if not fp8:
            check_bits(scheme.a_bit, 2)

        def act(x, s=None, global_scale=None):
            return scaled_act_quant(x, s, scheme.a_bit, fp8)
    return Quantizer(scheme, weight, scaled_weight, act)


def fp4_quantizer(scheme: Scheme) -> Quantizer:
    """NVFP4 / MXFP4 (quant/fp4.py): a weight's own global scale (NVFP4) unless quantized with the linears it is
    fused with (Quantizer.weights); W4A4 NVFP4 activations per token and group of 16 against a static global
    input scale."""
    check_scheme(scheme)  # w_bit 4, the format's group, symmetric; activations FP4 of the same format or none

    def weight(w):
        return fake_quant_weight_nvfp4(w) if scheme.w_type == "nvfp4" else fake_quant_weight_mxfp4(w)

    def scaled_weight(w, s):
        return weight(w.to(compute_dtype(w.dtype)) * s).div_(s).to(w.dtype)

    act = None
    if scheme.a_bit is not None:
        if scheme.w_type != "nvfp4":
            raise VlmquantError(f"scheme {scheme.name}: FP4 activations are NVFP4 only here; use w_type nvfp4 or "
                                "drop a_bit")

        def act(x, s=None, global_scale=None):
            if global_scale is None:
                raise VlmquantError(f"scheme {scheme.name}: NVFP4 activations need the linear's static global input "
                                    "scale, calibrated from the calibration activations (fp4.input_global_scale)")
            work = x.to(torch.float32) if s is None else x.to(torch.float32).div(s)
            q = fake_quant_act_nvfp4(work, global_scale)
            return (q if s is None else q.mul_(s)).to(x.dtype)
    return Quantizer(scheme, weight, scaled_weight, act)


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
    (quantizer(scheme).act), as the scaled model sees it, Q_a(x/s)·s, when `s` (C_in,) is set. Linears that
    share one input tensor (q/k/v, gate/up) quantize it once: the result is kept for that tensor, its version
    and `s` (and NVFP4's static `global_scale`), until `reset()`."""

    def __init__(self, scheme: Scheme, global_scale: torch.Tensor | None = None):
        self.act, self.s, self.last = quantizer(scheme).act, None, {}
        self.global_scale = global_scale  # NVFP4: the static global input scale (1,) of the hooked linears' input

    def __call__(self, module, args):
        x, last = args[0], self.last
        if (last.get("x") is not x or last["version"] != x._version or last["s"] is not self.s
                or last["global_scale"] is not self.global_scale):
            self.last = {"x": x, "version": x._version, "s": self.s, "global_scale": self.global_scale,
                         "q": self.act(x.detach(), self.s, self.global_scale)}
        return (self.last["q"], *args[1:])

    def reset(self):
        self.last = {}
