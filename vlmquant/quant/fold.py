"""Fold per-channel scales s into a scale group so the fp function is unchanged (DESIGN.md step 4).

The previous op's output channel j is divided by s_j and every following consumer's input column j
is multiplied by s_j: (x / s) · (W · s)^T = x · W^T. A scale cache is resolved against the model
once (`resolve_scales`: names, types, widths, finite positive scales); folding trusts the result.
Math runs in fp32, results are cast back to each parameter's dtype; s may live on any device.

What divides by s:
- a norm computing x̂·w (+ b) (LayerNorm, Llama-style RMSNorm): w /= s (and b /= s);
- a norm computing x̂·(1 + w) (Gemma, Qwen3.5/Qwen3-Next RMSNorms, UNIT_OFFSET_NORMS): 1 + w' = (1 + w)/s,
  so w' = (1 + w)/s − 1;
- a norm whose weight (d,) is shared by every head of a wider output (Qwen3.5's gated norm in linear
  attention, d = head_v_dim): s must repeat with period d, and w /= s[:d];
- a linear: its last len(s) output rows (and bias);
- fused experts gate_up_proj (E, 2I, H) with per-expert s (E, I): each expert's last I rows (its up rows).
What multiplies by s: the last dim of every consumer: nn.Linear weights (out, in), a router's weight
(E, in), fused expert weights (E, out, in) (s (in,) is shared by every expert, s (E, in) is per expert).
"""
from dataclasses import dataclass

import torch

from vlmquant.errors import VlmquantError

# norm classes computing x̂·(1 + w) (weights initialised to 0), from transformers' modeling files
UNIT_OFFSET_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Qwen3NextRMSNorm", "Qwen3_5RMSNorm",
                               "Qwen3_5MoeRMSNorm"})


@dataclass(frozen=True)
class Fold:
    """One resolved scale group: (prev_name, linear_names), their modules or (fused experts) parameters, and
    s fp32: (C,), or (E, C) for a per-expert group."""
    prev_name: str
    linear_names: tuple[str, ...]
    s: torch.Tensor
    prev: torch.nn.Module | torch.Tensor
    linears: tuple[torch.nn.Module | torch.Tensor, ...]


def _layer_index(name):
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def _part(root, name, source):
    """The module, or the parameter (fused experts), `name` under root."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        pass
    try:
        return root.get_parameter(name)
    except AttributeError:
        raise VlmquantError(f"{source}: module {name!r} does not exist in this model "
                            "(scale cache from another model?)") from None


def consumer_weight(part):
    """The weight whose last dim a consumer's inputs are: a 3-D parameter itself, else the module's .weight."""
    return part if isinstance(part, torch.Tensor) else getattr(part, "weight", None)


def resolve_scales(root, entries, source="scale cache", n_layers=None):
    """[(prev_name, linear_names, s)] (names relative to `root`) → [Fold], every entry checked.

    Checks: names resolve under `root` (modules, or fused expert parameters); consumers are linears, modules
    with a weight (out, len(s)) (routers) or parameters (E, out, len(s)); prev is a linear with at least
    len(s) outputs, a norm with len(s) weights (or d weights, d dividing len(s), when s repeats with period
    d), or a fused parameter (E, ≥ len(s), in) for s (E, len(s)); s is 1-D (2-D only with such a prev),
    finite, positive. With `n_layers`, names must be `layers.{i}.…` and the entries must cover layers
    0..n_layers-1. Raises VlmquantError naming `source` and the entry.
    """
    if not isinstance(entries, (list, tuple)):
        raise VlmquantError(f"{source}: not a scale cache (no 'scale' list)")
    out, covered = [], set()
    for k, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise VlmquantError(f"{source}: entry {k} is not (prev_op_name, linear names, scales)")
        prev_name, linear_names, s = entry
        linear_names = tuple(linear_names)
        if not isinstance(s, torch.Tensor) or s.dim() not in (1, 2):
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
        prev = _part(root, prev_name, source)
        linears = tuple(_part(root, n, source) for n in linear_names)
        n = s.shape[-1]
        lead = tuple(s.shape[:-1])  # () or (E,)
        if lead and not (isinstance(prev, torch.Tensor) and prev.dim() == 3 and prev.shape[0] == lead[0]):
            raise VlmquantError(f"{source}: entry {k} ({prev_name}): scales of shape {tuple(s.shape)} are per expert, "
                                f"but {prev_name} is not a fused experts weight with {lead[0]} experts")
        for name, lin in zip(linear_names, linears):
            w = consumer_weight(lin)
            if w is None or w.dim() not in (2, 3) or (isinstance(lin, torch.nn.Module) and w.dim() != 2):
                raise VlmquantError(f"{source}: {name} is a {type(lin).__name__}, not a linear layer")
            if w.shape[-1] != n or (lead and not (w.dim() == 3 and w.shape[0] == lead[0])):
                raise VlmquantError(f"{source}: {name} has {w.shape[-1]} input channels, the cache has "
                                    f"{'x'.join(map(str, s.shape))} scales (scale cache from another model?)")
        if isinstance(prev, torch.Tensor):
            ok = prev.dim() == 3 and prev.shape[-2] >= n
        elif isinstance(prev, torch.nn.Linear):
            ok = prev.out_features >= n
        else:
            w = getattr(prev, "weight", None)
            ok = w is not None and w.dim() == 1 and n % w.numel() == 0 and (
                w.numel() == n or torch.equal(s.view(-1, w.numel()), s[: w.numel()].expand(n // w.numel(), -1)))
        if not ok:
            raise VlmquantError(f"{source}: {prev_name} does not have {n} output channels to divide by the scales "
                                "(scale cache from another model?)")
        out.append(Fold(prev_name, linear_names, s.detach().float(), prev, linears))
    if n_layers is not None and covered != set(range(n_layers)):
        raise VlmquantError(f"{source}: covers decoder layers {sorted(covered)}, the model has {n_layers} "
                            "(scale cache from another model?)")
    return out


def _scale_input_columns(consumers, s):
    for c in consumers:
        w = consumer_weight(c)
        w.copy_(w.float() * s.to(w.device).unsqueeze(-2))  # (..., out, in) * (..., 1, in)


@torch.no_grad()
def scale_norm_into_linears(norm, linears, s):
    """norm.weight (and norm.bias) /= s; every consumer's weight[..., j] *= s[j]. In place.

    Norms computing weight * normalized(x) (+ bias): LayerNorm, Llama/Qwen2-style RMSNorm; x̂·(1 + w)
    norms (UNIT_OFFSET_NORMS): w' = (1 + w)/s − 1. A weight of d < len(s) channels (shared by the heads)
    takes s[:d] (resolve_scales checked that s repeats with period d).
    """
    s = s.detach().float()  # (C,)
    unit = type(norm).__name__ in UNIT_OFFSET_NORMS
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is not None:
            sp = s[: p.numel()].to(p.device)
            p.copy_((1 + p.float()) / sp - 1 if unit and p is norm.weight else p.float() / sp)
    _scale_input_columns(linears, s)


@torch.no_grad()
def scale_linear_into_linears(prev, linears, s):
    """prev's last len(s) output rows (and bias entries) /= s; every consumer's weight[..., j] *= s[..., j].
    In place. prev: an nn.Linear with s (n,), or fused expert weights (E, out, in) with s (E, n): each
    expert's last n rows."""
    s = s.detach().float()  # (n,) or (E, n)
    n = s.shape[-1]
    weight = prev if isinstance(prev, torch.Tensor) else prev.weight
    rows = weight[..., -n:, :]  # (..., n, in), a view
    rows.copy_(rows.float() / s.to(rows.device).unsqueeze(-1))
    if getattr(prev, "bias", None) is not None:
        tail = prev.bias[-n:]
        tail.copy_(tail.float() / s.to(tail.device))
    _scale_input_columns(linears, s)


@torch.no_grad()
def fold(folds):
    """Fold every resolved group (`resolve_scales`) into its modules, in place; the fp function is unchanged."""
    for f in folds:
        if isinstance(f.prev, (torch.nn.Linear, torch.Tensor)):
            scale_linear_into_linears(f.prev, f.linears, f.s)
        else:
            scale_norm_into_linears(f.prev, f.linears, f.s)


def fold_scales(root, entries, source="scale cache", n_layers=None):
    """resolve_scales then fold: [(prev_name, linear_names, s)] into the modules under `root`."""
    fold(resolve_scales(root, entries, source, n_layers))
