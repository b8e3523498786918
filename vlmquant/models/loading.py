"""Load only the tensors a job needs from a model folder's safetensors files.

The model is built on the meta device (no memory), then chosen submodules are moved to the
target device and filled from the checkpoint, tensor by tensor.
"""
import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from vlmquant.errors import VlmquantError
from vlmquant.models import get_adapter
from vlmquant.models.base import Adapter, check_model_folder


def resolve_dtype(name, device):
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name):
    """cpu, or the CUDA device this process holds (see claim_gpu)."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise VlmquantError("config: device is 'cuda' but no CUDA GPU is visible")
        return claim_gpu()
    return name


_claimed = {}


def claim_gpu():
    """Pin this process to a GPU no other vlmquant job on this machine holds.

    Snakemake's `gpu` resource bounds how many GPU jobs run at once; each job then takes the
    first free visible GPU, by an exclusive lock file held until the process exits. Under
    SLURM, CUDA_VISIBLE_DEVICES already holds only the job's own GPU(s).
    """
    if "device" in _claimed:
        return _claimed["device"]
    n = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n)))).split(",")
    waited = False
    while True:
        for i in range(n):
            lock = open(Path(tempfile.gettempdir()) / f"vlmquant-gpu-{visible[i].strip()}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            _claimed.update(device=f"cuda:{i}", lock=lock)
            torch.cuda.set_device(i)
            return _claimed["device"]
        if not waited:  # more GPU jobs than GPUs: give Snakemake --resources gpu=<number of GPUs>
            logging.getLogger(__name__).warning("all %d visible GPUs are busy with other vlmquant jobs; waiting", n)
            waited = True
        time.sleep(1)


class Checkpoint:
    """Tensor name → file index of a model folder (single file or sharded with an index json)."""

    def __init__(self, path):
        check_model_folder(path)
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise VlmquantError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def find_prefix(self, candidates):
        """The first candidate prefix under which the checkpoint has tensors."""
        for p in candidates:
            if any(k.startswith(p + ".") for k in self.files):
                return p
        raise VlmquantError(f"{self.path}: no tensors under any of {', '.join(candidates)}")

    def load_into(self, module, prefix, device, dtype):
        """Fill `module` (on meta or any device) with the tensors under `prefix.` of the checkpoint."""
        module.to_empty(device=device).to(dtype)  # meta params carry the config's dtype; compute in `dtype`
        names = dict(module.named_parameters()) | dict(module.named_buffers())
        by_file = {}
        for name in names:
            key = f"{prefix}.{name}"
            if key not in self.files:
                raise VlmquantError(f"{self.path}: tensor {key} not found in the checkpoint")
            by_file.setdefault(self.files[key], []).append(name)
        with torch.no_grad():
            for file, keys in by_file.items():
                with safe_open(self.path / file, "pt", device=str(device)) as f:
                    for name in keys:
                        t = f.get_tensor(f"{prefix}.{name}")
                        target = names[name]
                        if t.shape != target.shape:
                            raise VlmquantError(f"{self.path}: {prefix}.{name} has shape {tuple(t.shape)}, "
                                                f"the model expects {tuple(target.shape)}")
                        target.copy_(t.to(dtype if t.is_floating_point() else t.dtype))
        return module


def meta_model(adapter, path, trust_remote_code=False):
    """The full model on the meta device: structure and config, no memory."""
    check_model_folder(path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = getattr(transformers, adapter.model_class)
    with torch.device("meta"):
        model = cls._from_config(config)
    return model.eval()


def load_layers(adapter, path, indices, device, dtype, trust_remote_code=False):
    """{index: decoder layer with weights} for the given indices only."""
    model = meta_model(adapter, path, trust_remote_code)
    layers = adapter.layers(model)
    ckpt = Checkpoint(path)
    prefix = ckpt.find_prefix(adapter.checkpoint_layer_prefixes)
    out = {}
    for i in indices:
        if not 0 <= i < len(layers):
            raise VlmquantError(f"{path}: layer {i} requested, the model has {len(layers)} decoder layers")
        out[i] = ckpt.load_into(layers[i], f"{prefix}.{i}", device, dtype).eval()
    return out


@dataclass(frozen=True)
class ModelRef:
    """A model of the config (`models.<name>`) opened for a job: its adapter, folder, device and dtype."""
    adapter: Adapter
    path: str
    device: str
    dtype: torch.dtype
    trust_remote_code: bool = False
    stream: str = "auto"  # memory.stream: auto | always | never (models.stream.use_streaming)
    max_batch_mb: int | None = None  # memory.max_batch_mb: activations of one forward micro-batch; None = free memory
    grads_store_mb: int | None = None  # memory.grads_store_mb: the gradient stage's stored layer inputs; None = free memory

    def load(self, path=None):
        """The whole model on the device; `path`: another folder of the same family (a checkpoint)."""
        return self.adapter.load_model(path or self.path, self.dtype, self.device, self.trust_remote_code)

    def load_layers(self, indices):
        """{index: decoder layer with weights} for the given indices only."""
        return load_layers(self.adapter, self.path, indices, self.device, self.dtype, self.trust_remote_code)

    def processor(self):
        return self.adapter.load_processor(self.path, self.trust_remote_code)

    def config(self):
        return transformers.AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)


def open_model(model_cfg, device="auto", memory=None):
    """ModelRef of a `models.<name>` config dict (family, path, dtype, trust_remote_code) on `device`
    (auto | cpu | cuda: claims a free GPU, see claim_gpu); memory: the config's `memory` block (stream,
    max_batch_mb, grads_store_mb)."""
    device = resolve_device(device)
    memory = memory or {}
    return ModelRef(get_adapter(model_cfg["family"]), str(model_cfg["path"]), device,
                    resolve_dtype(model_cfg.get("dtype"), device), bool(model_cfg.get("trust_remote_code", False)),
                    memory.get("stream", "auto"), memory.get("max_batch_mb"), memory.get("grads_store_mb"))
