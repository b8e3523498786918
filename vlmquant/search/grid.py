"""MBQ per-group scale search (arXiv 2412.19509 §3; DESIGN.md algorithm step 3), top to bottom.

A scale group is one op (norm or linear) feeding one or more linears. For a per-input-channel
scale s, the linears' weights become W' = Q(W·s)/s, which is what the quantized model computes
once s has been folded into the previous op (see quant/fold.py). The search tries
s = a^α for α on a grid, a = mean |X| per input channel, and keeps the α whose block output is
closest to the fp output under `group_loss`: the objective, with the vision tokens' share weighted by
the layer's gradient ratio ρ (MBQ) or every token alike (AWQ). The layer search (search/layer.py) builds
one `GroupSearch` per group; `search_group` is what mbq and awq register for it.
"""
from dataclasses import dataclass

import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError
from vlmquant.methods import awq, mbq
from vlmquant.methods.base import register_group_search
from vlmquant.quant.fp4 import input_global_scale
from vlmquant.quant.quantizer import InputQuantizer, quantizer


# --- the objective ------------------------------------------------------------------------------
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
    check_loss(loss)
    return combine_sums(loss_sums(out_fp, out_q, masks, loss == "mse"), out_fp.shape[-1], loss, ratio)


def check_loss(loss):
    if loss not in ("mae", "mse"):
        raise VlmquantError(f"loss={loss!r} is not one of 'mae', 'mse'")


def loss_sums(out_fp, out_q, masks, square):
    """{"valid", "cap", "vis": (Σ d over those tokens (fp32 tensor), token count)} of group_loss."""
    if out_fp.shape != out_q.shape:
        raise VlmquantError(f"quantized output shape {tuple(out_q.shape)} differs from fp output shape {tuple(out_fp.shape)}")
    tok = token_distance(out_fp, out_q, square)  # (N,) fp32 per-token sums over channels
    valid = masks["valid"].reshape(-1).to(tok.device)
    if valid.numel() != tok.numel():
        raise VlmquantError(f"masks cover {valid.numel()} tokens but the outputs have {tok.numel()} (shape {tuple(out_fp.shape)})")
    out = {"valid": (tok[valid].sum(), int(valid.sum()))}
    for key in ("cap", "vis"):
        if key in masks:
            m = masks[key].reshape(-1).to(tok.device) & valid
            out[key] = (tok[m].sum(), int(m.sum()))
    return out


def combine_sums(sums, n_ch, loss, ratio):
    """group_loss from its loss_sums (added up over sample micro-batches)."""
    if ratio is None:
        s_valid, n_valid = sums["valid"]
        if n_valid == 0:
            raise VlmquantError("no valid (non-padding) tokens to measure the loss on")
        return float(s_valid / (n_valid * n_ch))
    (s_cap, n_cap), (s_vis, n_vis) = sums["cap"], sums["vis"]
    if n_cap + n_vis == 0:
        raise VlmquantError("no caption or vision tokens to measure the reweighted loss on")
    if loss == "mae":
        return float((s_cap + ratio * s_vis) / ((n_cap + n_vis) * n_ch))
    return float(s_cap / max(n_cap * n_ch, 1) + ratio * s_vis / max(n_vis * n_ch, 1))


def loss_tokens(masks, reweight: bool) -> torch.Tensor:
    """(N,) bool: the tokens `group_loss` reads: the valid ones, or with a ratio the valid caption and vision ones."""
    keep = masks["valid"].reshape(-1)
    if reweight:
        keep = keep & (masks["cap"].reshape(-1) | masks["vis"].reshape(-1))
    return keep


@dataclass
class GroupSearch:
    """One scale group's search job, from the layer search down to the loss (Method group search).

    x: the linears' fp input (B, T, C_in), every token; stat_masks: its masks (the channel statistics run over
    its valid tokens). linears: the quantized consumers: nn.Linear modules, or fused expert parameters
    (E, out, C_in) sharing s. One item per sample micro-batch in each of forwards (zero-arg callables running
    the group's block with the linears' current weights), fp_outs (the block's fp output at the tokens of the
    loss, all or only those it reads) and masks (theirs: "valid", "cap", "vis"). period: the scales repeat with
    this period (a norm weight shared by every head), or None. ratio: the group's reweight ratio ρ, None: no
    reweighting. act_modules: the modules whose first input is the group input, quantized per token under a
    weight-activation scheme (a fused consumer's experts module); None: the linears.
    fused: index sets of `linears` a serving engine fuses into one layer (quant.scheme.fused_sets),
    quantized together (one NVFP4 global scale); None: each alone.
    """
    x: torch.Tensor
    linears: list
    forwards: list
    fp_outs: list
    masks: list
    stat_masks: dict
    period: int | None = None
    ratio: float | None = None
    act_modules: list | None = None
    fused: list | None = None


@dataclass
class GroupResult:
    scales: torch.Tensor  # (C_in,) fp32, on the linears' device
    alpha: float
    losses: list[float]  # one per candidate; losses[0] is α = 0 (RTN)
    best_index: int


def block_loss(job: GroupSearch, loss: str) -> float:
    """group_loss of the job's block under the linears' current weights, over all its sample micro-batches: each
    batch's block runs and is measured in turn (an fp output kept in host memory moves to the output's device)."""
    check_loss(loss)
    total = None
    for run, fp_out, masks in zip(job.forwards, job.fp_outs, job.masks):
        out_q = run()
        sums = loss_sums(fp_out.to(out_q.device, non_blocking=True), out_q, masks, loss == "mse")
        total = sums if total is None else {k: (total[k][0] + v[0], total[k][1] + v[1]) for k, v in sums.items()}
    return combine_sums(total, job.fp_outs[0].shape[-1], loss, job.ratio)


# --- the candidates ----------------------------------------------------------------------------
def weight_of(linear):
    """The weight of a group's quantized consumer: an nn.Linear's, or a fused experts parameter itself."""
    return linear if isinstance(linear, torch.Tensor) else linear.weight


def grid_scales(a: torch.Tensor, n_grid: int) -> list[torch.Tensor]:
    """The candidates s = clamp(a^α, 1e-4) / sqrt(max(s)·min(s)), α = i / n_grid, i < n_grid, of channel means
    a (C,), or (E, C) with max and min per row (one expert each)."""
    out = []
    for i in range(n_grid):
        s = a.pow(i / n_grid).clamp_(min=1e-4)
        out.append(s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt())
    return out


def pool_period(v: torch.Tensor, period: int | None, reduce: str = "mean") -> torch.Tensor:
    """A channel statistic (C,) made periodic: reduced over the C / period repeats and tiled back (scales
    shared by every head, whose norm has one weight per head channel); unchanged for period None."""
    if period is None or period == v.shape[-1]:
        return v
    heads = v.view(-1, period)
    return (heads.mean(0) if reduce == "mean" else heads.amax(0)).repeat(v.shape[-1] // period)


STAT_CHUNK_BYTES = 256 << 20


def channel_stat(x, masks, device, reduce="mean", chunk_bytes=STAT_CHUNK_BYTES):
    """mean |x| (reduce "mean") or max |x| ("max") per input channel over the valid (non-padding) tokens of the
    group input x (..., C_in), wherever x is kept (the device or host memory): (C_in,) on `device`, fp32 for the
    mean (a sum in fp32 over the tokens, then divided), x's dtype for the max. x moves to `device` in row chunks
    of at most chunk_bytes, so no full copy of it is made. Raises VlmquantError when no token is valid."""
    valid = masks["valid"].reshape(-1).to(device)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise VlmquantError("no valid (non-padding) tokens to compute activation statistics on")
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, chunk_bytes // (rows.shape[1] * rows.element_size()))
    acc = None
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step].to(device, non_blocking=True)[valid[start:start + step]].abs_()
        if part.shape[0] == 0:
            continue
        if reduce == "mean":
            part = part.sum(dim=0, dtype=torch.float32)
            acc = part if acc is None else acc.add_(part)
        else:
            part = part.amax(0)
            acc = part if acc is None else torch.maximum(acc, part)
    return acc.div_(n_valid) if reduce == "mean" else acc


# --- the search ------------------------------------------------------------------------------------
def candidate_losses(job: GroupSearch, candidates, spec) -> list[float]:
    """block_loss with each candidate scale vector s (C_in,) folded in and the weights fake-quantized.

    The weights become Q(W·s)/s under the run's scheme (quant.quantizer; fused linears quantized together), the
    input x/s; weight-activation schemes also quantize each linear's input per token as the scaled model sees it,
    Q_a(x/s)·s (NVFP4 against the static global scale of x/s over the job's valid tokens, as export calibrates
    it). The linears' weights are restored on return.
    """
    q = quantizer(spec.scheme)
    weights = [weight_of(lin) for lin in job.linears]
    originals = [w.detach().clone() for w in weights]
    fused = job.fused or [[i] for i in range(len(weights))]
    quantize_input = InputQuantizer(spec.scheme) if spec.scheme.a_bit is not None else None
    hooks = [m.register_forward_pre_hook(quantize_input) for m in job.act_modules or job.linears] \
        if quantize_input else []
    x_max = None
    if spec.scheme.w_type == "nvfp4" and quantize_input is not None:
        x_max = channel_stat(job.x, job.stat_masks, weights[0].device, "max")  # (C_in,)
    losses = []
    try:
        for s in candidates:
            if quantize_input is not None:
                quantize_input.s = s
            if x_max is not None:
                quantize_input.global_scale = input_global_scale(x_max, s)
            for idx in fused:
                for i, w_q in zip(idx, q.scaled_weights([originals[i] for i in idx], s)):
                    weights[i].copy_(w_q)
            losses.append(block_loss(job, spec.loss))
            if quantize_input is not None:
                quantize_input.reset()  # free the quantized input before the next candidate
    finally:
        for h in hooks:
            h.remove()
        for w, w0 in zip(weights, originals):
            w.copy_(w0)
    return losses


@register_group_search(mbq.METHOD, awq.METHOD)
@torch.no_grad()
def search_group(job: GroupSearch, spec) -> GroupResult:
    """Grid-search the per-input-channel scales of one group (the run's spec: scheme, n_grid, loss).

    Candidates: s = a^α normalized (grid_scales), a = mean |x| per channel (pooled over the repeats of
    `job.period`, for scales shared by heads), α = 0, 1/n_grid, …; the α with the strictly smallest loss wins
    (α = 0 is RTN, so the search never loses to RTN). Weights are restored on return. The layer's plan
    (search.plan) has checked the group's shapes and the scheme.
    """
    device = weight_of(job.linears[0]).device
    a = pool_period(channel_stat(job.x, job.stat_masks, device), job.period)  # (C_in,)
    grid = grid_scales(a, spec.n_grid)
    losses = candidate_losses(job, grid, spec)
    best = min(range(spec.n_grid), key=losses.__getitem__)  # the first of equal minima; NaN never beats α = 0
    return GroupResult(scales=grid[best], alpha=best / spec.n_grid, losses=losses, best_index=best)
