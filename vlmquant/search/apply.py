"""Fold per-channel scales s into a group so the fp function is unchanged.

The previous op's output channel j is divided by s_j and every following linear's input
column j is multiplied by s_j: (x / s) · (W · s)^T = x · W^T. Math runs in fp32, results are
cast back to each parameter's dtype; s may live on any device.
"""
import torch

from vlmquant.errors import VlmquantError


def _check_input_columns(linears, n: int) -> None:
    for lin in linears:
        if lin.weight.dim() != 2 or lin.weight.shape[1] != n:
            raise VlmquantError(f"linear weight of shape {tuple(lin.weight.shape)} does not take {n} scaled input channels")


def _scale_input_columns(linears, s: torch.Tensor) -> None:
    for lin in linears:
        w = lin.weight
        w.copy_(w.float() * s.to(w.device))  # (out, in) * (in,)


@torch.no_grad()
def scale_norm_into_linears(norm, linears, s: torch.Tensor) -> None:
    """norm.weight (and norm.bias) /= s; every linear's weight[:, j] *= s[j]. In place.

    For norms computing weight * normalized(x) (+ bias): LayerNorm, Llama/Qwen2-style RMSNorm.
    """
    s = s.detach().float()  # (C,)
    if norm.weight.shape != s.shape:
        raise VlmquantError(f"norm weight of shape {tuple(norm.weight.shape)} does not match {s.numel()} scales")
    _check_input_columns(linears, s.numel())
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is not None:
            p.copy_(p.float() / s.to(p.device))
    _scale_input_columns(linears, s)


@torch.no_grad()
def scale_linear_into_linears(prev, linears, s: torch.Tensor) -> None:
    """prev's last len(s) output rows (and bias entries) /= s; every linear's weight[:, j] *= s[j]. In place."""
    s = s.detach().float()  # (n,)
    n = s.numel()
    if prev.weight.dim() != 2 or prev.weight.shape[0] < n:
        raise VlmquantError(f"previous linear weight of shape {tuple(prev.weight.shape)} has fewer than {n} output rows to scale")
    _check_input_columns(linears, n)
    rows = prev.weight[-n:]  # (n, in), a view
    rows.copy_(rows.float() / s.to(rows.device)[:, None])
    if prev.bias is not None:
        tail = prev.bias[-n:]
        tail.copy_(tail.float() / s.to(tail.device))
    _scale_input_columns(linears, s)
