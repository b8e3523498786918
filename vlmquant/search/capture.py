"""Decoder-layer inputs: capture them from a model forward, run layers on them, store them.

A layer's inputs are its hidden states (B, T, C) plus the keyword arguments the language
model passes every layer (position embeddings, attention mask, position ids). They are the
same for every layer, so they are captured once in front of layer 0.
"""
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


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, layers, batch, device, dtype):
    """Run the model until its first decoder layer; return (hidden (B, T, C), layer kwargs)."""
    box = {}

    def hook(module, args, kwargs):
        box["args"], box["kwargs"] = args, kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**model_inputs(batch, device, dtype), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "kwargs" not in box:
        raise VlmquantError("the model forward never reached decoder layer 0")
    kwargs = dict(box["kwargs"])
    hidden = box["args"][0] if box["args"] else kwargs.pop("hidden_states")
    return hidden, {k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, tuple, bool)) and v is not None}


def layer_forward(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def save_layer_inputs(path, hidden, kwargs, meta):
    """hidden + kwargs → safetensors (tuples flattened as name.0, name.1, …; bools in metadata)."""
    out, flags = {"hidden": hidden}, {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[f"kw.{k}"] = v
        elif isinstance(v, tuple):
            out.update({f"kw.{k}.{i}": t for i, t in enumerate(v)})
            flags[k] = f"tuple:{len(v)}"
        else:
            flags[k] = v
    tensors.save(path, out, {**meta, "flags": flags})


def load_layer_inputs(path, device, dtype):
    """(hidden, kwargs, metadata) written by save_layer_inputs; floating tensors cast to dtype."""
    t, meta = tensors.load(path, "decoder-layer inputs file")
    cast = lambda x: x.to(device, dtype) if x.is_floating_point() else x.to(device)  # noqa: E731
    kwargs = {}
    for k, v in meta.pop("flags").items():
        if isinstance(v, str) and v.startswith("tuple:"):
            kwargs[k] = tuple(cast(t.pop(f"kw.{k}.{i}")) for i in range(int(v[6:])))
        else:
            kwargs[k] = v
    kwargs.update({k[3:]: cast(v) for k, v in t.items() if k.startswith("kw.")})
    return cast(t["hidden"]), kwargs, meta
