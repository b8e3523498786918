"""Decoder-layer inputs: capture them from a model forward, run layers on them, store them.

A layer's inputs are its hidden states (B, T, C) plus the keyword arguments the language model
passes it (position embeddings, attention mask, position ids). Those may differ by layer type
(Gemma 3: sliding-window and global layers get their own mask and RoPE), and the language model may
add to the hidden states between layers (Qwen3-VL's deepstack adds vision features at the image
positions after its first layers). `LayerArgs` holds all of it, captured in one forward that runs
no decoder layer, so that a layer run alone, or a chain of layers started anywhere, gets exactly
what the full model feeds it.
"""
from dataclasses import dataclass, field

import torch

from vlmquant.errors import VlmquantError
from vlmquant.io import ragged, tensors

# Batches are right-padded, so under causal attention no valid token ever attends to padding:
# the attention mask is left out of model calls, which keeps sdpa on its fused (flash) kernels.
# Padding positions then hold finite garbage that every statistic and loss excludes.
NOT_MODEL_INPUTS = ("labels", "vision_mask", "caption_mask", "attention_mask")


def load_samples(inputs_path):
    """(list of per-sample tensor dicts, provenance) of an inputs file."""
    packed, meta = ragged.load(inputs_path)
    return [ragged.sample(packed, i) for i in range(ragged.n_samples(packed))], meta


def token_masks(batch, device=None):
    """Per-token boolean masks (B, T): valid (not padding), cap (caption), vis (vision)."""
    valid = batch["attention_mask"].bool()
    masks = {"valid": valid, "cap": batch["caption_mask"].bool() & valid, "vis": batch["vision_mask"].bool() & valid}
    return {k: v.to(device) for k, v in masks.items()} if device is not None else masks


def model_inputs(batch, device, dtype):
    """The processor tensors only, on the device; floating ones (pixel values) in the model dtype."""
    out = {}
    for k, v in batch.items():
        if k in NOT_MODEL_INPUTS:
            continue
        out[k] = v.to(device, dtype) if v.is_floating_point() else v.to(device)
    return out


@dataclass
class LayerArgs:
    """What the language model gives its decoder layers besides the hidden states.

    sets: distinct keyword-argument dicts (tensors, tuples of tensors, bools); of_layer: for each decoder
    layer, the index of its set. added: {layer i: (mask (B, T) bool, values (N, C))}: after layer i the
    language model does hidden[mask] += values (Qwen3-VL deepstack); only entries of the layers a holder
    still runs are kept (see `from_layer`).
    """
    sets: list
    of_layer: list
    added: dict = field(default_factory=dict)

    def kwargs(self, i):
        """The keyword arguments of decoder layer i."""
        return self.sets[self.of_layer[i]]

    def after(self, i, hidden):
        """The hidden states the language model passes on after decoder layer i's output `hidden`."""
        if i not in self.added:
            return hidden
        mask, values = self.added[i]
        hidden = hidden.clone()  # as Qwen3VLTextModel._deepstack_process: the sum, written at the mask
        hidden[mask, :] = hidden[mask, :] + values.to(hidden.device, hidden.dtype)
        return hidden

    def forward(self, layer, i, hidden):
        """Decoder layer i on `hidden`, then what the language model adds after it."""
        return self.after(i, layer_forward(layer, hidden, self.kwargs(i)))

    def from_layer(self, first):
        """These arguments for a holder that runs layers `first`… only (additions before it are in its hidden)."""
        return LayerArgs(self.sets, self.of_layer, {i: a for i, a in self.added.items() if i >= first})


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer i for one forward: records what it is called with, runs nothing."""

    def __init__(self, box, i, last):
        super().__init__()
        self.box, self.i, self.last = box, i, last

    def forward(self, hidden_states, **kwargs):
        if self.i == 0:
            self.box["hidden"] = hidden_states
        self.box["kwargs"].append(kwargs)
        if self.last:
            raise _Stop  # nothing after the decoder layers is needed (no norm, no logits)
        return hidden_states


def _same(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _keep(kwargs):
    return {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, tuple, bool)) and v is not None}


@torch.no_grad()
def capture_layer_inputs(model, layers, batch, device, dtype, adapter=None):
    """Run the model with its decoder layers stood in for by recorders: (hidden (B, T, C) of layer 0, LayerArgs).

    `layers` is the model's decoder ModuleList (adapter.layers(model)); no decoder layer runs, nothing after
    them is computed. adapter: the family's, for what the language model adds between layers
    (Adapter.layer_additions); None adds nothing.
    """
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    name = next(n for n, c in parent.named_children() if c is layers)
    box, text_kwargs = {"kwargs": []}, {}
    setattr(parent, name, torch.nn.ModuleList(_Recorder(box, i, i == len(layers) - 1) for i in range(len(layers))))
    handle = parent.register_forward_pre_hook(lambda m, a, k: text_kwargs.update(k), with_kwargs=True)
    try:
        model(**model_inputs(batch, device, dtype), use_cache=False)
    except _Stop:
        pass
    finally:
        setattr(parent, name, layers)
        handle.remove()
    if len(box["kwargs"]) != len(layers):
        raise VlmquantError(f"the model forward reached {len(box['kwargs'])} of its {len(layers)} decoder layers")
    sets, of_layer = [], []
    for kwargs in map(_keep, box["kwargs"]):
        j = next((j for j, s in enumerate(sets) if s.keys() == kwargs.keys() and all(_same(s[k], kwargs[k]) for k in s)),
                 None)
        if j is None:
            sets.append(kwargs)
            j = len(sets) - 1
        of_layer.append(j)
    added = adapter.layer_additions(text_kwargs) if adapter is not None else {}
    return box["hidden"], LayerArgs(sets, of_layer, added)


def layer_forward(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def save_layer_inputs(path, hidden, args, meta):
    """hidden + LayerArgs → safetensors; meta["layer"] is the first layer the file feeds (additions before it
    are dropped). Tensors as kw.{set}.{name} (tuples flattened as .0, .1, …), add.{i}.mask/.values; the
    set of each layer and the bools in metadata."""
    args = args.from_layer(meta["layer"])
    out, flags = {"hidden": hidden}, []
    for j, kwargs in enumerate(args.sets):
        f = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                out[f"kw.{j}.{k}"] = v
            elif isinstance(v, tuple):
                out.update({f"kw.{j}.{k}.{i}": t for i, t in enumerate(v)})
                f[k] = f"tuple:{len(v)}"
            else:
                f[k] = v
        flags.append(f)
    for i, (mask, values) in args.added.items():
        out[f"add.{i}.mask"], out[f"add.{i}.values"] = mask, values
    storages = set()  # layer types and additions share tensors (position ids, one mask): safetensors stores copies
    for k, v in out.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in storages else v
        storages.add(ptr)
    tensors.save(path, out, {**meta, "flags": flags, "of_layer": args.of_layer, "added": sorted(args.added)})


def load_layer_inputs(path, device, dtype):
    """(hidden, LayerArgs, metadata) written by save_layer_inputs; floating tensors cast to dtype."""
    t, meta = tensors.load(path, "decoder-layer inputs file")
    cast = lambda x: x.to(device, dtype) if x.is_floating_point() else x.to(device)  # noqa: E731
    sets = []
    for j, flags in enumerate(meta.pop("flags")):
        kwargs = {}
        for k, v in flags.items():
            if isinstance(v, str) and v.startswith("tuple:"):
                kwargs[k] = tuple(cast(t.pop(f"kw.{j}.{k}.{i}")) for i in range(int(v[6:])))
            else:
                kwargs[k] = v
        prefix = f"kw.{j}."
        kwargs.update({k[len(prefix):]: cast(v) for k, v in t.items() if k.startswith(prefix)})
        sets.append(kwargs)
    added = {i: (t[f"add.{i}.mask"].to(device), cast(t[f"add.{i}.values"])) for i in meta.pop("added")}
    return cast(t["hidden"]), LayerArgs(sets, meta.pop("of_layer"), added), meta
