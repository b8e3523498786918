"""MBQ per-group scale search: the modality-weighted loss, the α grid, SmoothQuant's closed form.

A scale group is one op (norm or linear) feeding one or more linears. For a per-input-channel
scale s, the linears' weights become W' = Q(W·s)/s, which is what the quantized model computes
once s has been folded into the previous op (see search/apply.py). The search tries
s = a^α for α on a grid, a = mean |X| per input channel, and keeps the α whose output is
closest to the fp output under `group_loss`.
"""
from dataclasses import dataclass

import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import (
    check_bits,
    check_weight_groups,
    compute_dtype,
    scaled_fake_quant,
    fake_quant_sym_rows_,
)


@cuda_compiled
def token_distance(out_fp: torch.Tensor, out_q: torch.Tensor, square: bool) -> torch.Tensor:
    """Σ over channels of |fp - q| (or (fp - q)^2) per token, summed in fp32: (N,).

    The difference is taken in the outputs' dtype (bf16 on GPU: no fp32 copies of the outputs).
    """
    d = out_fp.reshape(-1, out_fp.shape[-1]) - out_q.reshape(-1, out_q.shape[-1])
    return (d.square_() if square else d.abs_()).sum(dim=-1, dtype=torch.float32)


def group_loss(out_fp: torch.Tensor, out_q: torch.Tensor, masks: dict, loss: str = "mae", ratio: float | None = None) -> float:
    """Distance between fp and quantized outputs, (N, C) or (B, T, C), over the masked tokens.

    masks: per-token bool tensors (N,) or (B, T): "valid" (non-padding), "cap" (caption tokens),
    "vis" (vision tokens); cap/vis are intersected with valid. d = |fp - q| (mae) or (fp - q)^2 (mse),
    sums and counts run over elements (tokens x channels):
      ratio None:   mean(d) over valid tokens
      mae + ratio:  (sum d over cap + ratio * sum d over vis) / (N_cap + N_vis)
      mse + ratio:  mean(d over cap) + ratio * mean(d over vis)   (an empty set adds 0)
    """
    if loss not in ("mae", "mse"):
        raise VlmquantError(f"loss={loss!r} is not one of 'mae', 'mse'")
    if out_fp.shape != out_q.shape:
        raise VlmquantError(f"quantized output shape {tuple(out_q.shape)} differs from fp output shape {tuple(out_fp.shape)}")
    tok = token_distance(out_fp, out_q, loss == "mse")  # (N,) fp32 per-token sums over channels
    n_ch = out_fp.shape[-1]
    valid = masks["valid"].reshape(-1).to(tok.device)
    if valid.numel() != tok.numel():
        raise VlmquantError(f"masks cover {valid.numel()} tokens but the outputs have {tok.numel()} (shape {tuple(out_fp.shape)})")
    if ratio is None:
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise VlmquantError("no valid (non-padding) tokens to measure the loss on")
        return float(tok[valid].sum() / (n_valid * n_ch))
    cap = masks["cap"].reshape(-1).to(tok.device) & valid
    vis = masks["vis"].reshape(-1).to(tok.device) & valid
    n_cap, n_vis = int(cap.sum()), int(vis.sum())
    if n_cap + n_vis == 0:
        raise VlmquantError("no caption or vision tokens to measure the reweighted loss on")
    s_cap, s_vis = tok[cap].sum(), tok[vis].sum()
    if loss == "mae":
        return float((s_cap + ratio * s_vis) / ((n_cap + n_vis) * n_ch))
    return float(s_cap / max(n_cap * n_ch, 1) + ratio * s_vis / max(n_vis * n_ch, 1))


@dataclass
class GroupResult:
    scales: torch.Tensor  # (C_in,) fp32, on the linears' device
    alpha: float
    losses: list[float]  # one per grid point; losses[0] is α = 0 (RTN)
    best_index: int


@torch.no_grad()
def search_group(x, linears, forward, fp_out, masks, *, w_bit, w_group, n_grid=20, loss="mae", ratio=None, act_bits=None) -> GroupResult:
    """Grid-search the per-input-channel scales of one group.

    x: the linears' fp input, (N, C_in) or (B, T, C_in). linears: modules with a .weight (out, C_in).
    forward: zero-arg callable running the group's module on its fp inputs with the linears'
    current weights, returning a tensor shaped like fp_out. Weights are restored on return.
    act_bits: weight-activation mode; weights are quantized symmetric per output channel with
    w_bit, and each linear's input is quantized per token with act_bits as the scaled model
    would see it: Q_a(x/s)·s.
    """
    if n_grid < 1:
        raise VlmquantError(f"n_grid={n_grid} must be at least 1")
    check_bits(w_bit, 1 if act_bits is None else 2)
    if act_bits is not None:
        check_bits(act_bits, 2)
    weights = [lin.weight for lin in linears]
    n_in = x.shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != n_in:
            raise VlmquantError(f"linear weight of shape {tuple(w.shape)} does not take the group input's {n_in} channels")
        if act_bits is None:
            check_weight_groups(w.shape, w_group)
    group = w_group if w_group > 0 else n_in
    device = weights[0].device

    # a = mean |x| per input channel over valid tokens: (C_in,) fp32
    valid = masks["valid"].reshape(-1).to(x.device)
    xv = x.reshape(-1, n_in)[valid]  # (N_valid, C_in)
    if xv.shape[0] == 0:
        raise VlmquantError("no valid (non-padding) tokens to compute activation statistics on")
    a = xv.abs_().mean(dim=0, dtype=torch.float32).to(device)
    del xv

    originals = [w.detach().clone() for w in weights]
    if act_bits is not None:  # one flat buffer in the quantization dtype, viewed as each weight in turn
        buf = torch.empty(max(w.numel() for w in weights), dtype=compute_dtype(weights[0].dtype), device=device)

    def quantize_input(module, args):  # reads the grid loop's current s
        xs = args[0].to(compute_dtype(args[0].dtype)) / s  # (..., C_in)
        return (fake_quant_sym_rows_(xs, act_bits).mul_(s).to(args[0].dtype),) + args[1:]

    hooks = [lin.register_forward_pre_hook(quantize_input) for lin in linears] if act_bits is not None else []
    losses, best_index, best_s = [], 0, None
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = a.pow(alpha).clamp_(min=1e-4)
            s /= (s.max() * s.min()).sqrt()  # (C_in,)
            for w, w0 in zip(weights, originals):
                if act_bits is None:
                    w.copy_(scaled_fake_quant(w0, s, w_bit, group))
                else:
                    ws = torch.mul(w0, s, out=buf[: w0.numel()].view(w0.shape))  # W·s, (out, C_in)
                    w.copy_(fake_quant_sym_rows_(ws, w_bit).div_(s))
            losses.append(group_loss(fp_out, forward(), masks, loss, ratio))
            if i == 0 or losses[i] < losses[best_index]:
                best_index, best_s = i, s
    finally:
        for h in hooks:
            h.remove()
        for w, w0 in zip(weights, originals):
            w.copy_(w0)
    return GroupResult(scales=best_s, alpha=best_index / n_grid, losses=losses, best_index=best_index)


@torch.no_grad()
def smoothquant_scales(x_absmax: torch.Tensor, linears, alpha: float) -> torch.Tensor:
    """SmoothQuant scales s_j = max|X_j|^α / max|W_j|^(1-α), fp32 (C_in,).

    x_absmax: (C_in,) max |x| per input channel over the calibration tokens; max|W_j| is the
    largest |weight| in column j over all the linears' output rows. Both are clamped to >= 1e-5.
    """
    n_in = x_absmax.shape[-1]
    w_max = torch.zeros(n_in, dtype=torch.float32, device=x_absmax.device)
    for lin in linears:
        if lin.weight.shape[-1] != n_in:
            raise VlmquantError(f"linear weight of shape {tuple(lin.weight.shape)} does not take the {n_in} channels of x_absmax")
        w = lin.weight.detach()
        col_max = torch.maximum(w.amax(dim=0), w.amin(dim=0).neg())  # (C_in,)
        w_max = torch.maximum(w_max, col_max.float().to(w_max.device))
    x_max = x_absmax.float().clamp(min=1e-5)
    return x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
