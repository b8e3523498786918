"""Write a model's weights shard by shard, as transformers' save_pretrained writes them from memory, without
ever holding the whole model: the same tensor names (its reverse checkpoint key mapping), order, shard
split (huggingface_hub's greedy split by max_shard_size), file names, safetensors metadata and index.

`saved_state` maps a state dict to what save_pretrained would write (names, weight conversions), from the model
on the meta device for the order and from each decoder layer as it is loaded for the tensors; `ShardWriter`
takes them one at a time in that order and writes a shard whenever the next tensor would overflow it, under a
temporary name until the number of shards is known.
"""
import json
import os
from pathlib import Path

from safetensors.torch import save_file
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from vlmquant.errors import VlmquantError

WEIGHTS = "model{suffix}.safetensors"
INDEX = "model.safetensors.index.json"


UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(size):
    """export.max_shard_size in bytes: an integer, or a string like 5GB, 500MB (decimal, as huggingface_hub reads
    them) or 2GiB (binary)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * UNITS[unit])
            except ValueError:
                break
    raise VlmquantError(f"config: export.max_shard_size: {size!r} is not a size like 5GB, 500MB or 2GiB")


def saved_state(model, state):
    """{saved name: tensor} of a state dict `state` (names as in the model) as save_pretrained writes it, in its
    order: transformers' reverse key mapping and weight conversions (Qwen3.5-MoE's fused experts written one
    tensor per expert). Tensors on any device, meta included."""
    return revert_weight_conversion(model, state)


def config_files(config, generation_config, dtype, architecture, folder):
    """config.json (with dtype and architectures as save_pretrained sets them) and, when given,
    generation_config.json."""
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [architecture]
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


class ShardWriter:
    """Safetensors shards of at most max_shard_size bytes (a tensor larger than that alone in its own), written as
    tensors arrive in save order; `close()` names them model-0000k-of-0000n.safetensors (one shard:
    model.safetensors) and writes the index. Metadata of every shard: {"format": "pt"}, as save_pretrained."""

    def __init__(self, folder, max_shard_size):
        self.folder = Path(folder)
        self.max = shard_bytes(max_shard_size)
        self.files, self.keys = [], []  # per written shard: temporary file, tensor names
        self.current, self.size, self.total, self.parameters = {}, 0, 0, 0

    def add(self, name, tensor):
        """The next tensor in save order (any device; written from a contiguous CPU copy)."""
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        self.total += size
        if size > self.max:
            self._write({name: tensor})
            return
        if self.size + size > self.max:
            self._write(self.current)
            self.current, self.size = {}, 0
        self.current[name] = tensor
        self.size += size

    def _write(self, tensors):
        path = self.folder / f".shard-{len(self.files):05d}.tmp"
        save_file(tensors, path, metadata={"format": "pt"})
        self.files.append(path)
        self.keys.append(list(tensors))

    def close(self, total_parameters):
        """Rename the shards to their final names and, for more than one, write the index (total_parameters: the
        saved model's parameter count, as save_pretrained records it). Returns the shard file names."""
        if self.current or not self.files:
            self._write(self.current)
        n = len(self.files)
        names = [WEIGHTS.format(suffix="" if n == 1 else f"-{k + 1:05d}-of-{n:05d}") for k in range(n)]
        for path, name in zip(self.files, names):
            os.replace(path, self.folder / name)
        if n > 1:
            index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total},
                     "weight_map": {key: name for name, keys in zip(names, self.keys) for key in keys}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return names


def layer_state(model, layers_path, index, layer):
    """{saved name: tensor} of decoder layer `index` (a module holding its weights as they are to be saved), in
    save order (model: the whole model, for transformers' key mapping and weight conversions)."""
    return saved_state(model, {f"{layers_path}.{index}.{k}": v for k, v in layer.state_dict().items()})


def write_streamed(folder, skeleton, layers_path, shell_state, process_layer, release_layer, max_shard_size):
    """Every tensor of the model in save order into `folder`: decoder layer i's from process_layer(i) (a module
    holding the weights to save; they replace the whole block of the layer's tensors; release_layer(i) after),
    the others from `shell_state` ({name in the model: tensor}). skeleton: the whole model (meta device).
    Returns the shard file names. VlmquantError if transformers would write a tensor made from several decoder
    layers, or from a decoder layer and other weights."""
    writer = ShardWriter(folder, max_shard_size)
    prefix = layers_path + "."
    state = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
    of_layer = {}  # decoder-layer tensor → its layer
    for name in state:
        if name.startswith(prefix):
            of_layer.setdefault(int(name[len(prefix):].split(".", 1)[0]), {})[name] = state[name]
    owner = {saved: i for i, part in of_layer.items() for saved in saved_state(skeleton, part)}
    outside = saved_state(skeleton, {k: shell_state[k] for k in state if not k.startswith(prefix)})
    parameters = sum(p.numel() for name, p in skeleton.named_parameters() if not name.startswith(prefix))
    done = set()
    for saved in saved_state(skeleton, state):
        if saved in outside:
            writer.add(saved, outside[saved])
            continue
        if saved not in owner:
            raise VlmquantError(f"{type(skeleton).__name__}: transformers writes {saved} from several decoder layers "
                                "or other weights, which the streamed export cannot do; set memory.stream: never")
        i = owner[saved]
        if i in done:
            continue
        layer = process_layer(i)
        parameters += sum(p.numel() for p in layer.parameters())
        for key, tensor in layer_state(skeleton, layers_path, i, layer).items():
            writer.add(key, tensor)
        release_layer(i)
        done.add(i)
    return writer.close(parameters)
