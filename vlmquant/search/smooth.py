"""SmoothQuant (arXiv 2211.10438): s_j = max|X_j|^α / max|W_j|^(1−α), α from the config, no search.

The scales move activation outliers into the weights so that per-token activation quantization loses less.
The job is the same GroupSearch as MBQ's grid search (search/grid.py); its losses report RTN (s = 1) next to
the smoothed scales, which are kept whatever their loss.
"""
import torch

from vlmquant.errors import VlmquantError
from vlmquant.methods import smoothquant
from vlmquant.methods.base import register_group_search
from vlmquant.search.grid import GroupResult, GroupSearch, candidate_losses, channel_stat, pool_period, weight_of


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


@register_group_search(smoothquant.METHOD)
@torch.no_grad()
def smooth_group(job: GroupSearch, spec) -> GroupResult:
    """SmoothQuant scales of one group (spec.alpha), the maxima over the valid tokens of job.x and over the rows
    of all the group's linears (and over the repeats of job.period). losses = [RTN (s = 1), smoothed]."""
    device = weight_of(job.linears[0]).device
    x_max = channel_stat(job.x, job.stat_masks, device, "max")  # (C_in,)
    s = smoothquant_scales(x_max, job.linears, spec.alpha, job.period)
    losses = candidate_losses(job, [torch.ones_like(s), s], spec)
    return GroupResult(scales=s, alpha=spec.alpha, losses=losses, best_index=1)
