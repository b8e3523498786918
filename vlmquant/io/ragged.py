"""Ragged per-sample tensors in one safetensors file.

Per-token tensors (shape (1, T) per sample) are stored concatenated as 1-D with
`offsets.tokens`; every other tensor (pixel values, grid sizes) is concatenated along dim 0
with its own `offsets.<key>`. `collate` pads per-token tensors to a batch (right padding,
`attention_mask` 0 on padding).
"""
import torch

from vlmquant.errors import VlmquantError
from vlmquant.io import tensors

# token_type_ids: Gemma 3's image-token marks (its bidirectional image attention is built from them)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels", "vision_mask",
              "caption_mask")
PAD = {"labels": -100}


def pack(samples):
    """list of {key: tensor with batch dim 1} → flat dict of tensors."""
    keys = list(samples[0])
    out = {}
    for k in keys:
        parts = [s[k][0] if k in TOKEN_KEYS else s[k] for s in samples]
        out[k] = torch.cat(parts).contiguous()
        if k not in TOKEN_KEYS:
            out[f"offsets.{k}"] = offsets([p.shape[0] for p in parts])
    out["offsets.tokens"] = offsets([s["input_ids"].shape[1] for s in samples])
    return out


def offsets(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


def save(packed, path, metadata):
    tensors.save(path, packed, metadata)


def load(path):
    """(tensors, metadata) of a packed file."""
    return tensors.load(path, "model inputs file")


def n_samples(packed):
    return packed["offsets.tokens"].numel() - 1


def sample(packed, i):
    """Sample i as {key: tensor with batch dim 1 for per-token keys}."""
    out = {}
    t0, t1 = packed["offsets.tokens"][i].item(), packed["offsets.tokens"][i + 1].item()
    for k, v in packed.items():
        if k.startswith("offsets."):
            continue
        if k in TOKEN_KEYS:
            out[k] = v[t0:t1][None]
        else:
            o = packed[f"offsets.{k}"]
            out[k] = v[o[i].item():o[i + 1].item()]
    return out


def collate(samples):
    """Right-pad per-token tensors to (B, T_max); concatenate the rest along dim 0."""
    T = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for k in samples[0]:
        if k in TOKEN_KEYS:
            rows = [torch.nn.functional.pad(s[k][0], (0, T - s[k].shape[1]), value=PAD.get(k, 0)) for s in samples]
            out[k] = torch.stack(rows)
        else:
            out[k] = torch.cat([s[k] for s in samples])
    if "attention_mask" not in out:
        raise VlmquantError("inputs have no attention_mask")
    return out
