"""GPTQ: a linear's weights rounded column by column, each rounding error compensated in the columns not yet
rounded through the inverse Hessian of the linear's calibration inputs.

Source: Frantar et al. 2022, "GPTQ" (arXiv 2210.17323), Alg. 1, after Optimal Brain Surgeon (Hassibi &
Stork 1993) and OBQ (arXiv 2208.11580). H is the input Hessian of vlmquant.search.hessian (uniform or
MBQ-modality weighted). Per weight row w (rows are independent), with U the upper Cholesky factor of
(H + λI)⁻¹ (Sec. 4, step 3; λ = dampening x mean diag H) and columns taken in order j = 0, 1, …:

    q_j = Q(w_j)                           (the scheme's quantizer, this column's group scale/zero point)
    e_j = (w_j - q_j) / U_jj
    w_k -= e_j U_jk      for k > j         (applied lazily: within a block of 128 columns at once,
                                             to the columns after the block once per block: Sec. 4, step 2)

Details, as the reference implementations do them:
- Dead inputs: a column whose H_jj = 0 (the input channel is 0 at every calibration token) gets H_jj = 1
  and weight 0, so it quantizes to exactly 0.
- act-order (the reference code's `act_order` heuristic, GPTQModel's desc_act): columns are processed in
  order of decreasing H_jj (ties in column order); `perm` says that order. Codes, scales and zero points are always returned in the original
  column order with contiguous groups (g_idx = column // w_group): compressed-tensors 0.20 only knows this
  layout (its `actorder: weight`; the g_idx layout `actorder: group` was removed), so act-order changes
  how the codes are found, not how they are stored.
- Group scales and zero points use the project's quantizer (quant.fake.asym_qparams / sym_qparams, the
  scale rounded to the weight's dtype), so codes follow quant.codes' conventions. Without act-order a
  group's parameters come from its current weights (original plus the error compensation received so far)
  just before its first column is rounded (the GPTQ reference); per-channel schemes (w_group -1) thus use
  the original rows. With act-order a group's columns are spread over the processing order, so every
  group's parameters come from the original weights before any update ("static groups").
- Weight-activation schemes (W8A8, W4A8) are per-channel symmetric int weights: GPTQ handles them like
  any; FP8 weights are refused.
"""
from dataclasses import dataclass

import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.codes import QuantizedWeight, quantize_weight
from vlmquant.quant.fake import asym_qparams, check_weight_groups, compute_dtype, sym_qparams
from vlmquant.quant.scheme import Scheme, check_scheme

BLOCK = 128  # columns per lazy batch (GPTQ Sec. 4, step 2)


@dataclass
class GPTQResult:
    """quantized: codes, scales, zero points in the original column order (quant.codes.QuantizedWeight);
    perm: (C_in,) long, the processing order with act-order, else None; rtn: rounded to nearest instead
    (an expert with too few calibration tokens, gptq_experts)."""
    quantized: QuantizedWeight
    perm: torch.Tensor | None = None
    rtn: bool = False

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (out, C_in) in `dtype` (the pseudo-quantized weight export writes)."""
        return self.quantized.dequantize(dtype)

    @property
    def g_idx(self) -> torch.Tensor:
        """(C_in,) int32 group of each column: column // group, act-order or not (see the module doc)."""
        n_in = self.quantized.codes.shape[1]
        return torch.arange(n_in, dtype=torch.int32, device=self.quantized.codes.device) // self.quantized.group


def check_inputs(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, dampening: float) -> int:
    """Raise a one-line VlmquantError unless GPTQ can run on w (out, C_in) with H (C_in, C_in); the group size."""
    check_scheme(scheme)
    if scheme.w_type != "int":
        raise VlmquantError(f"GPTQ rounds integer weights; scheme {scheme.name} has w_type {scheme.w_type}: "
                            "use method rtn for FP8")
    if w.dim() != 2:
        raise VlmquantError(f"GPTQ weight of shape {tuple(w.shape)} is not 2-D (out, in)")
    if h.shape != (w.shape[1], w.shape[1]):
        raise VlmquantError(f"GPTQ Hessian of shape {tuple(h.shape)} does not match the weight {tuple(w.shape)}: "
                            f"it must be ({w.shape[1]}, {w.shape[1]})")
    if not dampening > 0:
        raise VlmquantError(f"GPTQ dampening={dampening!r} must be > 0 (0.01 is standard)")
    if not torch.isfinite(h).all():
        raise VlmquantError("GPTQ Hessian has inf/nan entries: check the calibration inputs of this layer")
    return check_weight_groups(tuple(w.shape), scheme.w_group)


def inverse_cholesky(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = dampening x mean diag H: (H + λI)⁻¹ = UᵀU."""
    h = h.clone()
    h.diagonal().add_(dampening * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise VlmquantError(f"GPTQ Hessian is not positive definite with dampening={dampening}: raise dampening "
                            "(e.g. 0.1) or use more calibration samples")
    return upper


class Quantizer:
    """Group scales/zero points of one weight under a scheme, and the rounding of one column with them.

    Per group g: scale[g], and the level bounds lo[g], hi[g] (q - zero in [-zero, 2^b - 1 - zero] for asymmetric
    schemes, q in [-2^(b-1), 2^(b-1) - 1] for symmetric ones), each (out,) in the compute dtype."""

    def __init__(self, n_out: int, n_in: int, scheme: Scheme, group: int, scale_dtype: torch.dtype, like: torch.Tensor):
        self.bits, self.symmetric, self.scale_dtype, self.group = scheme.w_bit, scheme.symmetric, scale_dtype, group
        half = 2 ** (self.bits - 1)
        self.scale = like.new_ones(n_in // group, n_out)
        self.lo = like.new_full((n_in // group, n_out), -half if self.symmetric else 0)
        self.hi = like.new_full((n_in // group, n_out), half - 1 if self.symmetric else 2**self.bits - 1)

    def set_group(self, g: int, wg: torch.Tensor) -> None:
        """Parameters of group g from its weights wg (out, group)."""
        if self.symmetric:
            self.scale[g] = sym_qparams(wg, self.bits, self.scale_dtype)[:, 0]
            return
        scale, zero = asym_qparams(wg, self.bits, self.scale_dtype)
        self.scale[g], self.lo[g], self.hi[g] = scale[:, 0], -zero[:, 0], 2**self.bits - 1 - zero[:, 0]

    def level_(self, out: torch.Tensor, col: torch.Tensor, g: int) -> torch.Tensor:
        """Write the integer levels (q - zero, or q) of a column (out,) in group g into `out`, as floats."""
        return torch.div(col, self.scale[g], out=out).round_().clamp_(self.lo[g], self.hi[g])

    def codes(self, levels: torch.Tensor, dtype: torch.dtype) -> QuantizedWeight:
        """QuantizedWeight of levels (out, C_in) in the original column order (quant.codes' signed convention)."""
        scale = self.scale.T.to(dtype)
        if self.symmetric:
            return QuantizedWeight(levels.to(torch.int8), scale, None, self.group)
        zero_point = (-self.lo - 2 ** (self.bits - 1)).T  # (out, n_groups)
        codes = levels + zero_point.repeat_interleave(self.group, dim=1)
        return QuantizedWeight(codes.to(torch.int8), scale, zero_point.to(torch.int8), self.group)


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, dampening: float = 0.01, act_order: bool = False,
         block: int = BLOCK) -> GPTQResult:
    """GPTQ codes of a linear weight w (out, C_in) (any float dtype, any device) for input Hessian h (C_in, C_in).

    Computes in fp32 (fp64 when w or h is fp64) on w's device; scales are rounded to w's dtype and returned in
    it, so `.weight(w.dtype)` is exactly (code - zero_point) x scale as a packed checkpoint stores it. Linears
    that share one input (q/k/v, gate/up) may be concatenated along rows: rows are independent. See the
    module doc for the algorithm and its sources. block: columns per lazy batch (when neither it nor the group
    size divides the other, the group size is used). Raises VlmquantError (one line) on shape mismatches, a group
    size not dividing C_in, a non-integer scheme, dampening <= 0, or a Hessian not positive definite.
    """
    group = check_inputs(w, h, scheme, dampening)
    n_out, n_in = w.shape
    dtype = torch.promote_types(compute_dtype(w.dtype), h.dtype)
    W = w.detach().to(dtype=dtype, copy=True)
    H = h.detach().to(device=w.device, dtype=dtype, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    quant = Quantizer(n_out, n_in, scheme, group, w.dtype, W)
    perm = None
    if act_order:
        for g in range(n_in // group):  # static groups, from the original weights
            quant.set_group(g, W[:, g * group:(g + 1) * group])
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    col_group = ((perm if act_order else torch.arange(n_in, device=W.device)) // group).tolist()
    U = inverse_cholesky(H, dampening)
    if group < n_in and block % group and group % block:
        block = group  # a group starts at a block start or lies inside one block
    Wt = W.T.contiguous()  # (C_in, out): a column is one contiguous row
    neg_diag = -U.diagonal()
    levels = torch.empty_like(Wt)  # in processing order
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]  # (count, out), (count, count)
        err = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if not act_order and j % group == 0:
                src = W1[i:i + group] if i + group <= i2 - i1 else Wt[j:j + group]  # Wt is current at a block start
                quant.set_group(j // group, src.T)
            g = col_group[j]
            quant.level_(levels[j], W1[i], g)
            torch.mul(levels[j], quant.scale[g], out=err[i]).sub_(W1[i]).div_(neg_diag[j])  # (w - q) / U_jj
            W1[i + 1:].addr_(U1[i, i + 1:], err[i], alpha=-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)
    levels = levels.T
    if act_order:
        levels = levels[:, torch.argsort(perm)]
    return GPTQResult(quant.codes(levels, w.dtype), perm)


def gptq_experts(w: torch.Tensor, hessians: list, scheme: Scheme, min_tokens: int, dampening: float = 0.01,
                 act_order: bool = False) -> list:
    """GPTQ of every expert's weight w (E, out, C_in) with its own Hessian (hessian.expert_hessians or one
    Hessian per expert), as a list of E GPTQResults. An expert whose Hessian has fewer than `min_tokens`
    calibration tokens is rounded to nearest instead (quant.codes.quantize_weight) and its result says
    `rtn=True`. Raises VlmquantError when the numbers of experts and Hessians differ."""
    if w.dim() != 3 or len(hessians) != w.shape[0]:
        raise VlmquantError(f"expert weights of shape {tuple(w.shape)} and {len(hessians)} Hessians: they must be "
                            "(E, out, in) with one Hessian per expert")
    out = []
    for e, h in enumerate(hessians):
        if h.n_tokens < min_tokens:
            out.append(GPTQResult(quantize_weight(w[e], scheme), rtn=True))
        else:
            out.append(gptq(w[e], h.value(), scheme, dampening, act_order))
    return out
