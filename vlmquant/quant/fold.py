"""Fold per-channel scales s into a scale group so the fp function is unchanged (DESIGN.md step 4).

The previous op's output channel j is divided by s_j and every following linear's input column j
is multiplied by s_j: (x / s) · (W · s)^T = x · W^T. A scale cache is resolved against the model
once (`resolve_scales`: names, types, widths, finite positive scales); folding trusts the result.
Math runs in fp32, results are cast back to each parameter's dtype; s may live on any device.
"""
from dataclasses import dataclass

import torch

from vlmquant.errors import VlmquantError


@dataclass(frozen=True)
class Fold:
    """One resolved scale group: the modules of (prev_name, linear_names) and s (C,) fp32."""
    prev_name: str
    linear_names: tuple[str, ...]
    s: torch.Tensor
    prev: torch.nn.Module
    linears: tuple[torch.nn.Module, ...]


def _layer_index(name):
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def _module(root, name, source):
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise VlmquantError(f"{source}: module {name!r} does not exist in this model "
                            "(scale cache from another model?)") from None


def resolve_scales(root, entries, source="scale cache", n_layers=None):
    """[(prev_name, linear_names, s)] (names relative to `root`) → [Fold], every entry checked.

    Checks: names resolve under `root`; linears are nn.Linear taking len(s) inputs; prev is a
    linear with at least len(s) outputs or a norm with len(s) weights; s is 1-D, finite, positive.
    With `n_layers`, names must be `layers.{i}.…` and the entries must cover layers 0..n_layers-1.
    Raises VlmquantError naming `source` and the entry.
    """
    if not isinstance(entries, (list, tuple)):
        raise VlmquantError(f"{source}: not a scale cache (no 'scale' list)")
    out, covered = [], set()
    for k, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise VlmquantError(f"{source}: entry {k} is not (prev_op_name, linear names, scales)")
        prev_name, linear_names, s = entry
        linear_names = tuple(linear_names)
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            raise VlmquantError(f"{source}: entry {k} ({prev_name}): scales are not a 1-D tensor")
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise VlmquantError(f"{source}: entry {k} ({prev_name}): scales must be finite and positive")
        if n_layers is not None:
            for name in (prev_name, *linear_names):
                i = _layer_index(name)
                if i is None or i >= n_layers:
                    raise VlmquantError(f"{source}: module {name!r} is not in this model's {n_layers} decoder layers "
                                        "(scale cache from another model?)")
                covered.add(i)
        prev = _module(root, prev_name, source)
        linears = tuple(_module(root, n, source) for n in linear_names)
        n = s.numel()
        for name, lin in zip(linear_names, linears):
            if not isinstance(lin, torch.nn.Linear):
                raise VlmquantError(f"{source}: {name} is a {type(lin).__name__}, not a linear layer")
            if lin.in_features != n:
                raise VlmquantError(f"{source}: {name} has {lin.in_features} input channels, the cache has {n} scales "
                                    "(scale cache from another model?)")
        if isinstance(prev, torch.nn.Linear):
            ok = prev.out_features >= n
        else:
            ok = getattr(prev, "weight", None) is not None and prev.weight.shape == (n,)
        if not ok:
            raise VlmquantError(f"{source}: {prev_name} does not have {n} output channels to divide by the scales "
                                "(scale cache from another model?)")
        out.append(Fold(prev_name, linear_names, s.detach().float(), prev, linears))
    if n_layers is not None and covered != set(range(n_layers)):
        raise VlmquantError(f"{source}: covers decoder layers {sorted(covered)}, the model has {n_layers} "
                            "(scale cache from another model?)")
    return out


def _scale_input_columns(linears, s):
    for lin in linears:
        w = lin.weight
        w.copy_(w.float() * s.to(w.device))  # (out, in) * (in,)


@torch.no_grad()
def scale_norm_into_linears(norm, linears, s):
    """norm.weight (and norm.bias) /= s; every linear's weight[:, j] *= s[j]. In place.

    For norms computing weight * normalized(x) (+ bias): LayerNorm, Llama/Qwen2-style RMSNorm.
    """
    s = s.detach().float()  # (C,)
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is not None:
            p.copy_(p.float() / s.to(p.device))
    _scale_input_columns(linears, s)


@torch.no_grad()
def scale_linear_into_linears(prev, linears, s):
    """prev's last len(s) output rows (and bias entries) /= s; every linear's weight[:, j] *= s[j]. In place."""
    s = s.detach().float()  # (n,)
    n = s.numel()
    rows = prev.weight[-n:]  # (n, in), a view
    rows.copy_(rows.float() / s.to(rows.device)[:, None])
    if prev.bias is not None:
        tail = prev.bias[-n:]
        tail.copy_(tail.float() / s.to(tail.device))
    _scale_input_columns(linears, s)


@torch.no_grad()
def fold(folds):
    """Fold every resolved group (`resolve_scales`) into its modules, in place; the fp function is unchanged."""
    for f in folds:
        if isinstance(f.prev, torch.nn.Linear):
            scale_linear_into_linears(f.prev, f.linears, f.s)
        else:
            scale_norm_into_linears(f.prev, f.linears, f.s)


def fold_scales(root, entries, source="scale cache", n_layers=None):
    """resolve_scales then fold: [(prev_name, linear_names, s)] into the modules under `root`."""
    fold(resolve_scales(root, entries, source, n_layers))
