"""MBQ per-group scale search: the modality-weighted loss, the α grid, SmoothQuant's closed form.

A scale group is one op (norm or linear) feeding one or more linears. For a per-input-channel
scale s, the linears' weights become W' = Q(W·s)/s, which is what the quantized model computes
once s has been folded into the previous op (see quant/fold.py). The search tries
s = a^α for α on a grid, a = mean |X| per input channel, and keeps the α whose output is
closest to the fp output under `group_loss`.
"""
from dataclasses import dataclass

import torch

from vlmquant.compile import cuda_compiled
from vlmquant.errors import VlmquantError
from vlmquant.quant.codes import InputQuantizer, fake_quant
from vlmquant.quant.fake import check_bits, check_weight_groups, compute_dtype, fake_quant_sym_rows_, scaled_fake_quant


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


def block_loss(forward, fp_out, masks, loss, ratio):
    """group_loss of the block's output under the current weights. forward, fp_out and masks may instead be
    lists over sample micro-batches: each batch's block runs and is measured in turn, the loss is over all.
    An fp output kept in host memory is moved to the block output's device."""
    if callable(forward):
        out_q = forward()
        return group_loss(fp_out.to(out_q.device, non_blocking=True), out_q, masks, loss, ratio)
    check_loss(loss)
    total = None
    for run, out, m in zip(forward, fp_out, masks):
        out_q = run()
        sums = loss_sums(out.to(out_q.device, non_blocking=True), out_q, m, loss == "mse")
        total = sums if total is None else {k: (total[k][0] + v[0], total[k][1] + v[1]) for k, v in sums.items()}
    return combine_sums(total, fp_out[0].shape[-1], loss, ratio)


def loss_tokens(masks, reweight: bool) -> torch.Tensor:
    """(N,) bool: the tokens `group_loss` reads: the valid ones, or with a ratio the valid caption and vision ones."""
    keep = masks["valid"].reshape(-1)
    if reweight:
        keep = keep & (masks["cap"].reshape(-1) | masks["vis"].reshape(-1))
    return keep


@dataclass
class GroupSearch:
    """One scale group's inputs to a method (Method.group).

    x: the linears' fp input (B, T, C_in), every token (channel statistics over `stat_masks`).
    linears: the quantized consumers: nn.Linear modules, or fused expert parameters (E, out, C_in).
    forward: zero-arg callable running the group's block with the linears' current weights.
    fp_out: the block's fp output, at the tokens of `masks` (all, or only those the loss reads).
    period: the scales repeat with this period (a norm weight shared by every head), or None.
    forward, fp_out, masks may be lists, one item per sample micro-batch (grid.block_loss).
    """
    x: torch.Tensor
    linears: list
    forward: object
    fp_out: torch.Tensor
    masks: dict
    stat_masks: dict
    period: int | None = None


@dataclass
class GroupResult:
    scales: torch.Tensor  # (C_in,) fp32, on the linears' device
    alpha: float
    losses: list[float]  # one per grid point; losses[0] is α = 0 (RTN)
    best_index: int


def weight_of(linear):
    """The weight of a group's quantized consumer: an nn.Linear's, or a fused experts parameter itself."""
    return linear if isinstance(linear, torch.Tensor) else linear.weight


def _check_group(x, linears, scheme):
    check_bits(scheme.w_bit, 1 if scheme.a_bit is None and not scheme.symmetric else 2)
    if scheme.a_bit is not None:
        check_bits(scheme.a_bit, 2)
    n_in = x.shape[-1]
    for lin in linears:
        w = weight_of(lin)
        if w.dim() not in (2, 3) or w.shape[-1] != n_in:
            raise VlmquantError(f"linear weight of shape {tuple(w.shape)} does not take the group input's {n_in} channels")
        if w.dim() == 3 and scheme.a_bit is not None:
            raise VlmquantError("fused MoE experts: weight-activation runs (a_bit) are not supported: the experts' "
                                "inputs are computed inside transformers' fused forward, where no linear input can "
                                "be quantized per token")
        check_weight_groups(w.shape, scheme.w_group)


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


def candidate_losses(linears, forward, fp_out, masks, candidates, *, scheme, loss, ratio):
    """Block loss with each candidate scale vector s (C_in,) folded in and the weights fake-quantized.

    The weights become Q(W·s)/s under `scheme` (codes.Scheme: groups, symmetry, int or FP8), the input
    x/s; weight-activation schemes also quantize each linear's input per token as the scaled model sees
    it, Q_a(x/s)·s. The linears' weights are restored on return.
    """
    weights = [weight_of(lin) for lin in linears]
    device = weights[0].device
    originals = [w.detach().clone() for w in weights]
    fast = scheme.w_type == "int" and (not scheme.symmetric or scheme.w_group <= 0)
    group = scheme.w_group if scheme.w_group > 0 else weights[0].shape[-1]
    if scheme.symmetric and fast:  # one flat buffer in the quantization dtype, viewed as each weight in turn
        buf = torch.empty(max(w.numel() for w in weights), dtype=compute_dtype(weights[0].dtype), device=device)
    quantize_input = InputQuantizer(scheme) if scheme.a_bit is not None else None
    hooks = [lin.register_forward_pre_hook(quantize_input) for lin in linears] if quantize_input else []
    losses = []
    try:
        for s in candidates:
            if quantize_input is not None:
                quantize_input.s = s
            for w, w0 in zip(weights, originals):
                if not fast:  # symmetric groups, FP8: the export's own quantizer
                    w.copy_(fake_quant(w0.to(compute_dtype(w0.dtype)) * s, scheme).div_(s))
                elif not scheme.symmetric:
                    w.copy_(scaled_fake_quant(w0, s, scheme.w_bit, group))
                else:
                    ws = torch.mul(w0, s, out=buf[: w0.numel()].view(w0.shape))  # W·s, (out, C_in)
                    w.copy_(fake_quant_sym_rows_(ws, scheme.w_bit).div_(s))
            losses.append(block_loss(forward, fp_out, masks, loss, ratio))
            if quantize_input is not None:
                quantize_input.reset()  # free the quantized input before the next candidate
    finally:
        for h in hooks:
            h.remove()
        for w, w0 in zip(weights, originals):
            w.copy_(w0)
    return losses


@torch.no_grad()
def search_group(x, linears, forward, fp_out, masks, *, scheme, n_grid=20, loss="mae", ratio=None,
                 stat_masks=None, period=None) -> GroupResult:
    """Grid-search the per-input-channel scales of one group.

    x: the linears' fp input, (N, C_in) or (B, T, C_in). linears: modules with a .weight (out, C_in), or
    fused expert parameters (E, out, C_in) sharing s. forward: zero-arg callable running the group's module
    on its fp inputs with the linears' current weights, returning a tensor shaped like fp_out. Weights are
    restored on return. masks go with fp_out (the loss), stat_masks (default: masks) with x (the channel
    statistics). forward, fp_out and masks may be lists over sample micro-batches (block_loss; stat_masks then
    required). Candidates: s = a^α normalized (grid_scales), a = mean |x| per channel (pooled over the
    repeats of `period`, for scales shared by heads), α = 0, 1/n_grid, …; the α with the strictly smallest
    loss wins (α = 0 is RTN). scheme: how weights (and activations) are quantized.
    """
    if n_grid < 1:
        raise VlmquantError(f"n_grid={n_grid} must be at least 1")
    _check_group(x, linears, scheme)
    device = weight_of(linears[0]).device
    a = pool_period(channel_stat(x, masks if stat_masks is None else stat_masks, device), period)  # (C_in,)
    grid = grid_scales(a, n_grid)
    losses = candidate_losses(linears, forward, fp_out, masks, grid, scheme=scheme, loss=loss, ratio=ratio)
    best = min(range(n_grid), key=losses.__getitem__)  # the first of equal minima; NaN never beats α = 0
    return GroupResult(scales=grid[best], alpha=best / n_grid, losses=losses, best_index=best)


@torch.no_grad()
def smooth_group(x, linears, forward, fp_out, masks, *, scheme, alpha=0.5, loss="mae", ratio=None,
                 stat_masks=None, period=None) -> GroupResult:
    """SmoothQuant scales, no search: s_j = max|X_j|^α / max|W_j|^(1−α), the maxima over valid tokens
    and over the rows of all the group's linears (and over the repeats of `period`). losses = [RTN (s = 1),
    smoothed]; the smoothed scales are kept whatever their loss. masks / stat_masks as in search_group."""
    _check_group(x, linears, scheme)
    device = weight_of(linears[0]).device
    x_max = channel_stat(x, masks if stat_masks is None else stat_masks, device, "max")  # (C_in,)
    s = smoothquant_scales(x_max, linears, alpha, period)
    losses = candidate_losses(linears, forward, fp_out, masks, [torch.ones_like(s), s], scheme=scheme, loss=loss,
                              ratio=ratio)
    return GroupResult(scales=s, alpha=alpha, losses=losses, best_index=1)


@torch.no_grad()
def smoothquant_scales(x_absmax: torch.Tensor, linears, alpha: float, period=None) -> torch.Tensor:
    """SmoothQuant scales s_j = max|X_j|^α / max|W_j|^(1-α), fp32 (C_in,).

    x_absmax: (C_in,) max |x| per input channel over the calibration tokens; max|W_j| is the
    largest |weight| in column j over all the linears' output rows. Both are clamped to >= 1e-5;
    with `period`, both maxima are taken over the repeats too (scales shared by heads).
    """
    n_in = x_absmax.shape[-1]
    w_max = torch.zeros(n_in, dtype=torch.float32, device=x_absmax.device)
    for lin in linears:
        w = weight_of(lin).detach()
        if w.shape[-1] != n_in:
            raise VlmquantError(f"linear weight of shape {tuple(w.shape)} does not take the {n_in} channels of x_absmax")
        w = w.reshape(-1, n_in)
        col_max = torch.maximum(w.amax(dim=0), w.amin(dim=0).neg())  # (C_in,)
        w_max = torch.maximum(w_max, col_max.float().to(w_max.device))
    x_max = pool_period(x_absmax.float(), period, "max").clamp(min=1e-5)
    return x_max.pow(alpha) / pool_period(w_max, period, "max").clamp(min=1e-5).pow(1 - alpha)


def grid_search(job: GroupSearch, spec, ratio=None) -> GroupResult:
    """Method.group of the searching methods (mbq, awq): search_group with the run's settings."""
    return search_group(job.x, job.linears, job.forward, job.fp_out, job.masks, scheme=spec.scheme, n_grid=spec.n_grid,
                        loss=spec.loss, ratio=ratio, stat_masks=job.stat_masks, period=job.period)


def smooth_search(job: GroupSearch, spec, ratio=None) -> GroupResult:
    """Method.group of smoothquant: smooth_group with the run's settings."""
    return smooth_group(job.x, job.linears, job.forward, job.fp_out, job.masks, scheme=spec.scheme, alpha=spec.alpha,
                        loss=spec.loss, ratio=ratio, stat_masks=job.stat_masks, period=job.period)
