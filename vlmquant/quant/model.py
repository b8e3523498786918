"""Whole-model operations: the language-decoder linears, `export.ignore`, folding a scale cache,
fake-quantizing the weights, quantizing activations at run time (fused experts included)."""
import contextlib
import fnmatch

import torch
import torch.nn.functional as F

from vlmquant.errors import VlmquantError
from vlmquant.quant.fake import check_weight_groups
from vlmquant.quant.fold import fold_scales
from vlmquant.quant.quantizer import InputQuantizer, quantizer
from vlmquant.quant.scheme import fused_sets


def layer_root(model, adapter):
    """The module whose `layers` attribute is the decoder stack (cache names are relative to it)."""
    return model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])


def pattern_matches(name, pattern):
    """Does an `export.ignore` pattern select the decoder linear `name` (e.g. 'layers.3.mlp.down_proj')?

    A pattern is a dotted module path matched anywhere on whole name segments ('mlp.down_proj',
    'layers.0.self_attn.q_proj', 'layers.2', 'self_attn'), or a glob ('layers.*.mlp.*_proj').
    """
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return f".{pattern}." in f".{name}."


def resolve_ignore(names, patterns, strict=True):
    """The subset of `names` (decoder linears, relative to the layer root) selected by `patterns`.

    strict: a pattern that selects nothing is an error (a typo); a search job that holds only some
    layers resolves with strict=False.
    """
    ignored = set()
    for p in patterns:
        hit = {n for n in names if pattern_matches(n, p)}
        if strict and not hit:
            example = names[0] if names else "layers.0.mlp.down_proj"
            raise VlmquantError(f"config: export.ignore: {p!r} matches no language-decoder linear "
                                f"(names are relative to the decoder layers, like {example!r})")
        ignored |= hit
    return ignored


def never_quantized(name, adapter):
    """Is the decoder module `name` (layers.{i}.…) one of the adapter's keep_fp linears (routers' gates…)?"""
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[2] in adapter.keep_fp


def decoder_linears(model, adapter, exclude=()):
    """[(name relative to the layer root, module)] of every nn.Linear in the decoder layers that may be
    quantized (not the adapter's keep_fp), minus the names in `exclude` (exact names, e.g. a checkpoint's
    `ignored_modules`)."""
    exclude = set(exclude)
    return [(name, m) for name, m in layer_root(model, adapter).named_modules()
            if name.startswith("layers.") and isinstance(m, torch.nn.Linear) and name not in exclude
            and not never_quantized(name, adapter)]


def layer_experts(layer, adapter):
    """[(name relative to the layer, parameter)] of one decoder layer's fused expert weights (E, out, in)
    (adapter.expert_weights; none without an adapter)."""
    out = []
    for name in (adapter.expert_weights if adapter else ()):
        try:
            out.append((name, layer.get_parameter(name)))
        except AttributeError:
            continue
    return out


def decoder_experts(model, adapter):
    """[(name relative to the layer root, parameter)] of the fused expert weights (E, out, in) of the decoder
    layers (adapter.expert_weights), quantized per expert like linears."""
    return [(f"layers.{i}.{n}", w) for i, layer in enumerate(adapter.layers(model)) for n, w in layer_experts(layer, adapter)]


def groups_to_fold(folds, ignored):
    """(folds to apply, prev names of the others) for resolved groups (quant.fold.Fold) and a set of ignored
    linear names: a group whose linears are all ignored is not folded (its scales only serve their
    quantization); a partly ignored one is, to keep the fp function."""
    keep = [f for f in folds if not set(f.linear_names) <= ignored]
    return keep, [f.prev_name for f in folds if set(f.linear_names) <= ignored]


def apply_scale_cache(model, adapter, cache, source="scale cache"):
    """Fold a scale cache (names relative to the decoder stack) into the model; fp function unchanged."""
    fold_scales(layer_root(model, adapter), cache["scale"], source, n_layers=len(adapter.layers(model)))


@torch.no_grad()
def quantize_linears(named, spec):
    """Replace every linear's weight (or fused expert parameter (E, out, in), per expert) of [(name, module or
    parameter)] with its fake-quantized value under the run's scheme (spec.scheme), linears a serving engine fuses
    (quant.scheme.fused_sets of the names) quantized together: the weights of the pseudo checkpoint, equal to the
    packed checkpoint's codes × scales."""
    q = quantizer(spec.scheme)
    weights = [lin if isinstance(lin, torch.Tensor) else lin.weight for _, lin in named]
    for idx in fused_sets([n for n, _ in named]):
        for i, w_q in zip(idx, q.weights([weights[i] for i in idx])):
            weights[i].copy_(w_q)


def check_experts(experts, spec):
    """Can the fused expert weights [(name, parameter)] be quantized under the run? Raises VlmquantError for a
    w_group not dividing an expert weight's input width. Shapes only: the parameters may be on the meta device."""
    for name, w in experts:
        try:
            check_weight_groups(tuple(w.shape), spec.scheme.w_group)
        except VlmquantError as e:
            raise VlmquantError(f"{name}: {e}") from None


def check_gated_experts(experts):
    """Raise unless `experts` is transformers' fused gated experts module (gate_up_proj, down_proj, act_fn)."""
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or \
            not getattr(experts, "has_gate", True) or not hasattr(experts, "act_fn"):
        raise VlmquantError(f"{type(experts).__name__}: only gated fused experts without bias (gate_up_proj "
                            "(E, 2I, H), down_proj (E, H, I)) are supported")


def expert_modules(layer, adapter):
    """The modules holding one decoder layer's fused expert weights (adapter.expert_weights), each once."""
    out = []
    for name in (adapter.expert_weights if adapter else ()):
        try:
            module = layer.get_submodule(name.rsplit(".", 1)[0])
        except AttributeError:
            continue
        if not any(m is module for m in out):
            out.append(module)
    return out


def quantized_experts_forward(experts, act):
    """The forward of a fused gated experts module (check_gated_experts) with both its inputs quantized per token
    by `act` (quantizer(scheme).act), as a W·A· MoE kernel does: the hidden states once for every expert's gate/up,
    and down_e's input act(gate_e x) * up_e x on each routed (token, expert) pair. Otherwise transformers' eager
    experts loop: out (N, H) = Σ over a token's experts of its routing weight × down_e(...).

    Signature as the module's: (hidden_states (N, H), top_k_index (N, k), top_k_weights (N, k)) → (N, H).
    """
    check_gated_experts(experts)

    def forward(hidden_states, top_k_index, top_k_weights):
        x, out = act(hidden_states), torch.zeros_like(hidden_states)
        n_experts = experts.gate_up_proj.shape[0]
        for e in top_k_index.unique().tolist():
            if e >= n_experts:  # transformers' marker of a token routed nowhere (expert parallelism)
                continue
            token, pos = torch.where(top_k_index == e)
            gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(act(experts.act_fn(gate) * up), experts.down_proj[e]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    return forward


def pseudo_quantize(model, adapter, spec, exclude=()):
    """Fake-quantize every decoder-layer linear of the model, minus the names in `exclude`, and every fused expert
    weight per expert (check_experts first). Weight-activation schemes quantize the experts' inputs at run time
    (quantized_activations)."""
    experts = decoder_experts(model, adapter)
    check_experts(experts, spec)
    quantize_linears(decoder_linears(model, adapter, exclude) + experts, spec)


@contextlib.contextmanager
def quantized_inputs(linears, scheme, experts=(), input_scales=None):
    """While inside, every linear sees its input fake-quantized per token as `scheme` (codes.Scheme) says, and every
    fused experts module in `experts` runs quantized_experts_forward: the runtime half of a weight-activation
    (W·A·) run. A weight-only scheme or None: no change. input_scales: NVFP4 W4A4's static global input scale of
    each linear (floats, in order; experts take none: NVFP4 W4A4 is refused for them in search.plan). Yields the
    number of hooked linears and experts modules."""
    if scheme is None or scheme.a_bit is None:
        yield 0
        return
    hooks = {}  # one per static input scale (None: the integer/FP8 schemes' one)
    handles = []
    for lin, gs in zip(linears, input_scales or [None] * len(linears)):
        if gs not in hooks:
            hooks[gs] = InputQuantizer(scheme, None if gs is None else torch.tensor([gs], dtype=torch.float32))
        handles.append(lin.register_forward_pre_hook(hooks[gs]))
    # an instance `forward` (as accelerate's hooks set one) is put back on exit
    previous = [m.__dict__.get("forward") for m in experts]
    expert_act = quantizer(scheme).act if experts else None
    for m in experts:
        m.forward = quantized_experts_forward(m, expert_act)
    try:
        yield len(handles) + len(experts)
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(experts, previous):
            if f is None:
                del m.forward
            else:
                m.forward = f
        for hook in hooks.values():
            hook.reset()


def quantized_activations(model, adapter, scheme, exclude=(), input_scales=None):
    """quantized_inputs over every decoder-layer linear of the model, minus the names in `exclude`
    (a checkpoint's `ignored_modules`), and every fused experts module. scheme: the checkpoint's (quantization.json
    `scheme`), or None; input_scales: its NVFP4 W4A4 {name: static global input scale} (quantization.json
    `input_global_scales`)."""
    named = decoder_linears(model, adapter, exclude)
    return quantized_inputs([lin for _, lin in named], scheme,
                            [m for layer in adapter.layers(model) for m in expert_modules(layer, adapter)],
                            None if input_scales is None else [input_scales[n] for n, _ in named])
