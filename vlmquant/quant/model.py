"""Whole-model operations: fold a scale cache into a model, fake-quantize its decoder linears."""
import contextlib
import fnmatch

import torch

from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import InputQuantizer, fake_quant_weight, fake_quant_weight_per_channel_sym
from vlmquant.search.apply import scale_linear_into_linears, scale_norm_into_linears


def layer_root(model, adapter):
    """The module whose `layers` attribute is the decoder stack (cache names are relative to it)."""
    return model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])


def _module(root, name, source):
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise VlmquantError(f"{source}: module {name} does not exist in this model") from None


@torch.no_grad()
def fold_scales(root, entries, source="scale cache"):
    """Fold every (prev, linears, s) into the modules of `root` (names relative to it); fp function unchanged."""
    for prev_name, linear_names, s in entries:
        prev = _module(root, prev_name, source)
        linears = [_module(root, n, source) for n in linear_names]
        for n, lin in zip(linear_names, linears):
            if lin.weight.shape[1] != s.numel():
                raise VlmquantError(f"{source}: {n} has {lin.weight.shape[1]} input channels, "
                                    f"the cache has {s.numel()} scales (cache from another model?)")
        if isinstance(prev, torch.nn.Linear):
            scale_linear_into_linears(prev, linears, s)
        else:
            scale_norm_into_linears(prev, linears, s)


def groups_to_fold(entries, ignored):
    """(entries to fold, prev names of the others) for (prev, linears, s) entries and a set of ignored
    linear names: a group whose linears are all ignored is not folded (its scales only serve their
    quantization); a partly ignored one is, to keep the fp function."""
    fold = [e for e in entries if not set(e[1]) <= ignored]
    return fold, [e[0] for e in entries if set(e[1]) <= ignored]


def apply_scale_cache(model, adapter, cache, source="scale cache"):
    """Fold a scale cache (names relative to the decoder stack) into the model; fp function unchanged."""
    fold_scales(layer_root(model, adapter), cache["scale"], source)


def pattern_matches(name, pattern):
    """Does an `export.ignore` pattern select the decoder linear `name` (e.g. 'layers.3.mlp.down_proj')?

    A pattern is a dotted module path matched anywhere on whole name segments ('mlp.down_proj',
    'layers.0.self_attn.q_proj', 'layers.2', 'self_attn'), or a glob ('layers.*.mlp.*_proj').
    """
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return f".{pattern}." in f".{name}."


def resolve_ignore(names, patterns):
    """The subset of `names` selected by `patterns`; a pattern that selects nothing is an error (typo)."""
    ignored = set()
    for p in patterns:
        hit = {n for n in names if pattern_matches(n, p)}
        if not hit:
            example = names[0] if names else "layers.0.mlp.down_proj"
            raise VlmquantError(f"config: export.ignore: {p!r} matches no language-decoder linear "
                                f"(names are relative to the decoder layers, like {example!r})")
        ignored |= hit
    return ignored


def decoder_linears(model, adapter, ignore=()):
    """(name relative to the layer root, module) of every nn.Linear in the decoder layers, minus `ignore`."""
    root = layer_root(model, adapter)
    out = []
    for name, module in root.named_modules():
        if name.startswith("layers.") and isinstance(module, torch.nn.Linear):
            if not any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in ignore):
                out.append((name, module))
    return out


@torch.no_grad()
def quantize_linears(linears, run):
    """Replace every linear's weight with its fake-quantized value: per output channel, symmetric, for
    weight-activation runs (a_bit set), else asymmetric in groups of w_group."""
    for lin in linears:
        if run.get("a_bit"):
            lin.weight.copy_(fake_quant_weight_per_channel_sym(lin.weight, run["w_bit"]))
        else:
            lin.weight.copy_(fake_quant_weight(lin.weight, run["w_bit"], run["w_group"]))


def pseudo_quantize(model, adapter, run, ignore=()):
    """Fake-quantize every decoder-layer linear (minus `ignore`)."""
    quantize_linears([lin for _, lin in decoder_linears(model, adapter, ignore)], run)


@contextlib.contextmanager
def quantized_inputs(linears, a_bit):
    """While inside, every linear sees its input fake-quantized per token with `a_bit` bits, symmetric
    abs-max: the runtime half of a weight-activation (W·A·) run. `a_bit` None (weight-only): no change.
    Yields the number of hooked linears."""
    if a_bit is None:
        yield 0
        return
    hook = InputQuantizer(a_bit)
    handles = [lin.register_forward_pre_hook(hook) for lin in linears]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
        hook.reset()


def quantized_activations(model, adapter, a_bit, ignore=()):
    """quantized_inputs over every decoder-layer linear of the model (minus `ignore`)."""
    return quantized_inputs([lin for _, lin in decoder_linears(model, adapter, ignore)], a_bit)
