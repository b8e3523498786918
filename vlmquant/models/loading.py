"""Load only the tensors a job needs from a model folder's safetensors files.

The model is built on the meta device (no memory), then chosen submodules are moved to the
target device and filled from the checkpoint, tensor by tensor.
"""
import contextlib
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
from vlmquant.io.fingerprint import check_finite, check_finite_files
from vlmquant.io.model_folder import safetensors_header
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
            for name in sorted(set(self.files.values())):
                safetensors_header(self.path / name)
        elif (self.path / "model.safetensors").is_file():
            safetensors_header(self.path / "model.safetensors")
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

    def shape(self, key):
        with safe_open(self.path / self.files[key], "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def load_into(self, module, prefix, device, dtype, expert_layouts=("fused",)):
        """Fill `module` (on meta or any device) with the tensors under `prefix.` of the checkpoint.

        Fused expert weights (…experts.gate_up_proj (E, 2I, H), …experts.down_proj (E, H, I)) are read in
        any of `expert_layouts` (Adapter.expert_layouts): "fused" as the module holds them, "transposed"
        ((E, H, 2I) and (E, I, H): the Qwen3-VL-MoE releases), "per_expert" (experts.{e}.gate_proj.weight,
        up_proj, down_proj: what transformers 5.24 saves for Qwen3.5-MoE). Another layout is a VlmquantError
        naming the tensor.
        """
        module.to_empty(device=device).to(dtype)  # meta params carry the config's dtype; compute in `dtype`
        names = dict(module.named_parameters()) | dict(module.named_buffers())
        reads = {}  # name → (checkpoint keys, their tensors → the parameter)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            if f"{parent.rpartition('.')[2]}.{leaf}" in EXPERT_WEIGHTS:
                shapes = {n: tuple(names[f"{parent}.{n}"].shape) for n in ("gate_up_proj", "down_proj")}
                reads[name] = self._expert_read(prefix, parent, leaf, shapes, expert_layouts)
            elif f"{prefix}.{name}" in self.files:
                reads[name] = [f"{prefix}.{name}"], lambda t: t[0]
            else:
                raise VlmquantError(f"{self.path}: tensor {prefix}.{name} not found in the checkpoint")
        with torch.no_grad(), contextlib.ExitStack() as stack:
            opened = {}
            for name, (keys, combine) in reads.items():
                tensors = []
                for key in keys:
                    file = self.files[key]
                    if file not in opened:
                        opened[file] = stack.enter_context(safe_open(self.path / file, "pt", device=str(device)))
                    tensors.append(opened[file].get_tensor(key))
                t = combine(tensors)
                if t.is_floating_point():
                    check_finite({keys[0]: t}, self.path / self.files[keys[0]])
                target = names[name]
                if t.shape != target.shape:
                    raise VlmquantError(f"{self.path}: {prefix}.{name} has shape {tuple(t.shape)}, "
                                        f"the model expects {tuple(target.shape)}")
                target.copy_(t.to(dtype if t.is_floating_point() else t.dtype))
        return module

    def _expert_read(self, prefix, parent, leaf, shapes, layouts):
        """(keys, combine) of the fused expert weight `parent.leaf`; shapes: the module's gate_up_proj and down_proj."""
        keys = {n: f"{prefix}.{parent}.{n}" for n in shapes}
        if keys[leaf] not in self.files:
            return self._per_expert(f"{prefix}.{parent}", leaf, shapes[leaf][0], layouts)
        if "transposed" not in layouts or not all(k in self.files for k in keys.values()):
            return [keys[leaf]], lambda t: t[0]
        # gate_up_proj (E, 2I, H) and down_proj (E, H, I) are never both square, so the pair of shapes tells the
        # layout even where one of them is square (transformers decides tensor by tensor, by shape alone)
        stored = {n: self.shape(k) for n, k in keys.items()}
        if stored != shapes and stored == {n: (e, n_in, out) for n, (e, out, n_in) in shapes.items()}:
            return [keys[leaf]], lambda t: t[0].transpose(1, 2)
        return [keys[leaf]], lambda t: t[0]

    def _per_expert(self, parent, leaf, n_experts, layouts):
        parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
        keys = [f"{parent}.{e}.{p}.weight" for e in range(n_experts) for p in parts]
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise VlmquantError(f"{self.path}: tensor {parent}.{leaf} not found in the checkpoint, nor per expert "
                                f"({missing[0]})")
        if "per_expert" not in layouts:
            raise VlmquantError(f"{self.path}: {parent} holds one tensor per expert ({keys[0]}), a layout "
                                "transformers does not load for this model (it would leave the experts random); "
                                "save the experts fused")
        n = len(parts)
        # gate_up_proj[e] = gate_proj ‖ up_proj along the output dim (gate rows first), as transformers merges them
        return keys, lambda t: torch.stack([torch.cat(t[e * n:(e + 1) * n]) for e in range(n_experts)])


# fused expert parameters (transformers 5 MoE blocks), relative to a decoder layer's experts module
EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")


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
        out[i] = ckpt.load_into(layers[i], f"{prefix}.{i}", device, dtype, adapter.expert_layouts).eval()
    return out


@dataclass(frozen=True)
class ModelRef:
    """A model of the config (`models.<name>`) opened for a job: its adapter, folder, device and dtype."""
    adapter: Adapter
    path: str
    device: str
    dtype: torch.dtype
    trust_remote_code: bool = False
    stream: str = "auto"  # memory.stream: auto | always | never (models.memory.use_streaming)
    max_batch_mb: int | None = None  # memory.max_batch_mb: activations of one forward micro-batch; None = free memory
    grads_store_mb: int | None = None  # memory.grads_store_mb: the gradient stage's stored layer inputs; None = free memory

    def load(self, path=None):
        """The whole model on the device; `path`: another folder of the same family (a checkpoint). The model's
        own weights are refused with one line when a tensor holds NaN or Inf (io.fingerprint.check_finite_files)."""
        if path is None:
            check_finite_files(sorted(Path(self.path).glob("*.safetensors")))
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

