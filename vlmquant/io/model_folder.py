"""A model folder's files as jobs need them: the tokenizer, processor and chat template next to the weights, and
safetensors shards whose header matches their size. Light (no torch), so the workflow checks folders at load."""
import json
import os
import struct
from pathlib import Path

from vlmquant.errors import VlmquantError

# the files a model folder needs besides config and weights: any one name of each kind
PROCESSOR_FILES = {
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "vocab.txt"),
    "processor": ("processor_config.json", "preprocessor_config.json"),
    "chat template": ("chat_template.jinja", "chat_template.json"),
}
TEMPLATE_KEY_FILES = ("tokenizer_config.json", "processor_config.json")  # may hold the chat template instead


def check_processor_files(folder, shown=None):
    """Refuse a model or checkpoint folder without tokenizer, processor or chat-template files (transformers builds
    an empty tokenizer without them): one line naming the folder and the missing files.
    The chat template may also be the `chat_template` key of tokenizer_config.json or processor_config.json.
    shown: the folder's name in the message (a temporary folder's final name)."""
    folder = Path(folder)
    keyed = any("chat_template" in json.loads((folder / n).read_text()) for n in TEMPLATE_KEY_FILES
                if (folder / n).is_file())
    missing = [f"{kind} ({' or '.join(names)})" for kind, names in PROCESSOR_FILES.items()
               if not any((folder / n).is_file() for n in names) and not (kind == "chat template" and keyed)]
    if missing:
        raise VlmquantError(f"{shown or folder}: no {'; no '.join(missing)}; copy them from the model's release into "
                            "the model folder")


def safetensors_header(path):
    """The JSON header of a safetensors file, after checking that its tensors' data ends where the file ends.

    Raises VlmquantError naming the file when it is shorter or longer than its header says (a truncated copy)
    or has no safetensors header.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise VlmquantError(f"{path}: not a safetensors file (no valid header); copy the shard again") from None
    if 8 + n + end != size:
        raise VlmquantError(f"{path}: safetensors shard is {size} bytes, its header says {8 + n + end} (truncated or "
                            "damaged copy); copy the shard again")
    return header


def load_whole(model_class, path, **kwargs):
    """model_class.from_pretrained(path, **kwargs), refused when transformers leaves any of the model's weights unset
    (missing from what it could read: they would run at random init, silently). transformers 5.25 reads no
    per-expert compressed-tensors experts into Qwen3-VL-MoE's fused experts, for one, and reports them only in its
    load table. Raises VlmquantError naming the folder, the count and the first such weight."""
    import transformers

    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise VlmquantError(f"{path}: transformers {transformers.__version__} leaves {len(missing)} weights of "
                            f"{model_class.__name__} unset when loading this folder (first: {missing[0]}), which would "
                            "run at random init; it cannot read this checkpoint's layout: load the pseudo checkpoint "
                            "(export.formats: [pseudo]) or decompress it with compressed-tensors")
    return model
