"""Safetensors files with our metadata: the one reader and writer of every such output.

A file holds named tensors plus, under the header key `vlmquant`, one JSON object in canonical
form (provenance.dumps: sorted keys, no whitespace), so equal content gives equal bytes.
"""
import json

from safetensors import safe_open
from safetensors.torch import save_file

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps

KEY = "vlmquant"


def save(path, tensors, meta):
    """Write {name: tensor} and the metadata dict `meta` to `path` atomically (tensors moved to CPU)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={KEY: dumps(meta)})


def load(path, what="vlmquant file", keys=None, device="cpu"):
    """(tensors, metadata) of a file written by `save`; only `keys` when given.

    Raises VlmquantError naming `path` and `what` it should have been when the file is missing,
    not safetensors, or has no vlmquant metadata.
    """
    try:
        with safe_open(path, "pt", device=str(device)) as f:
            meta = json.loads(f.metadata()[KEY])
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}, meta
    except Exception as e:  # missing file, not safetensors, no or bad metadata, missing key
        raise VlmquantError(f"{path}: not a {what} ({type(e).__name__}: {e}); delete it and rerun") from None


def read_meta(path, what="vlmquant file"):
    """The metadata dict of a file written by `save`, without reading its tensors."""
    return load(path, what, keys=())[1]
