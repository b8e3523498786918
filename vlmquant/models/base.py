"""The model-family adapter: everything the pipeline needs to know about one VLM family.

A family is data plus a few methods: the transformers classes, where the language decoder
layers live (never the vision tower), the scale groups of a decoder layer, the image
placeholder token, how a calibration row becomes processor inputs and masks, and the tiny
random-init demo model of the family. Each family is one module of vlmquant/models/families/.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from vlmquant.data.images import decode_image
from vlmquant.errors import VlmquantError
from vlmquant.models.processing import load_processor


@dataclass(frozen=True)
class ScaleGroup:
    """One scale search: `prev`'s output is divided by s, the input columns of `linears` multiplied.

    Names are relative to a decoder layer. The loss compares the output of `block`.
    `site` picks the reweight ratio ρ ("attn" or "mlp"). `token_wise`: each token's block output
    depends on that token's input only (an MLP, a linear; not attention), so the search may run
    the block on just the tokens its loss reads.
    """
    prev: str
    linears: tuple[str, ...]
    block: str
    site: str
    token_wise: bool = False


# Llama / Qwen2-style decoder layers (Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-OneVision, InternVL-HF).
LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "attn"),
    # only where v_proj's output width equals o_proj's input width (no grouped-query attention)
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "attn", token_wise=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "mlp", token_wise=True),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp", token_wise=True),
)


class Adapter:
    """Base of every family's adapter. Subclasses set the class names and override what differs."""
    model_class: str  # transformers class name; its config's model_type is the family name
    processor_class: str
    video_processor: str | None = None  # what AutoProcessor builds where torchvision is installed (demo config)
    groups: tuple[ScaleGroup, ...] = LLAMA_GROUPS
    attn_out = "self_attn.o_proj"  # gradients are taken at these outputs
    mlp_out = "mlp.down_proj"
    layers_path = "model.language_model.layers"  # decoder layer stack inside the top model
    # where checkpoints keep the decoder layers: transformers 5 names first, older layouts after
    checkpoint_layer_prefixes = ("model.language_model.layers", "model.layers", "language_model.model.layers")

    @property
    def family(self):
        """The family name: the Hugging Face model_type, which is the name of the adapter's module."""
        return type(self).__module__.rsplit(".", 1)[1]

    # --- loading -----------------------------------------------------------------------------
    def load_model(self, path, dtype=torch.float32, device="cpu", trust_remote_code=False):
        """The model of a folder: an fp model, a pseudo checkpoint, or a compressed-tensors checkpoint
        (dequantized on load: the call that loads every scheme in transformers 5.23-5.24)."""
        config = self.check_folder(path)
        cls = getattr(transformers, self.model_class)
        kwargs = {}
        if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
            kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        return model.to(device).eval()

    def load_processor(self, path, trust_remote_code=False):
        self.check_folder(path)
        return load_processor(path, getattr(transformers, self.processor_class), trust_remote_code)

    def check_folder(self, path):
        """The config.json dict of a model folder of this family's transformers architecture."""
        check_model_folder(path)
        config = json.loads((Path(path) / "config.json").read_text())
        if config.get("model_type") != self.family:
            raise VlmquantError(f"{path}: config.json has model_type {config.get('model_type')!r}, family {self.family} "
                                f"needs {self.family!r} (transformers' {self.model_class}); check models.<name>.family")
        return config

    # --- structure ---------------------------------------------------------------------------
    def layers(self, model) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def image_token_ids(self, config) -> list[int]:
        return [config.image_token_id]

    def resolve_groups(self, layer, index=0):
        """The groups that apply to this layer, checked against its modules."""
        out = []
        for g in self.groups:
            names = (g.prev, *g.linears, g.block)
            for n in names:
                try:
                    layer.get_submodule(n)
                except AttributeError:
                    raise VlmquantError(f"{self.family}: decoder layer {index} has no module '{n}'") from None
            prev = layer.get_submodule(g.prev)
            if isinstance(prev, torch.nn.Linear):
                widths = {prev.out_features} | {layer.get_submodule(n).in_features for n in g.linears}
                if len(widths) > 1:
                    continue  # e.g. v_proj → o_proj under grouped-query attention
            out.append(g)
        return out

    # --- inputs --------------------------------------------------------------------------------
    def messages(self, turns):
        return [{"role": t["role"],
                 "content": [{"type": "image"}] * len(t["images"]) + [{"type": "text", "text": t["text"]}]}
                for t in turns]

    def encode(self, processor, config, row):
        """One calibration row → processor tensors (batch dim 1) plus labels and masks, shape (1, T)."""
        order = [i for t in row["turns"] for i in t["images"]]
        if order != list(range(len(row["images"]))):
            raise VlmquantError(f"sample {row['sample_id']}: images must appear in order once each, got {order}")
        images = [decode_image(b, f"sample {row['sample_id']}: {name}") for b, name in zip(row["images"], row["file_names"])]
        text = processor.apply_chat_template(self.messages(row["turns"]), tokenize=False)
        enc = self.process(processor, text, images)
        ids = enc["input_ids"]
        vision = torch.isin(ids, torch.tensor(self.image_token_ids(config)))
        captions = [t["text"] for t in row["turns"] if t["role"] == "assistant"]
        caption = caption_mask(processor.tokenizer, ids[0], captions, row["sample_id"])[None]
        enc.update(labels=torch.where(caption, ids, -100), vision_mask=vision, caption_mask=caption)
        return enc

    def process(self, processor, text, images):
        """Processor tensors of one sample (batch dim 1). Tensors other than per-token ones must
        concatenate along dim 0 into the batch the model takes (io.ragged.collate)."""
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))

    # --- demo --------------------------------------------------------------------------------
    def demo(self):
        """(transformers config, processor) of the family's tiny random-init demo model (models/tiny.py's
        sizes and tokenizer), built offline."""
        raise NotImplementedError(f"family {self.family} has no demo model")


def caption_mask(tokenizer, ids, captions, sample_id):
    """Mark each caption's tokens, searched in order in `ids`, as True."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    ids_list, start = ids.tolist(), 0
    for text in captions:
        for candidate in (text, " " + text):
            toks = tokenizer(candidate, add_special_tokens=False)["input_ids"]
            pos = find_sublist(ids_list, toks, start)
            if pos >= 0:
                break
        else:
            raise VlmquantError(f"sample {sample_id}: could not find the caption tokens of {text[:40]!r} in the prompt")
        mask[pos:pos + len(toks)] = True
        start = pos + len(toks)
    return mask


def find_sublist(seq, sub, start=0):
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if seq[i:i + n] == sub:
            return i
    return -1


def check_model_folder(path):
    p = Path(path)
    if not (p / "config.json").is_file():
        raise VlmquantError(f"{path}: model folder not found or has no config.json (models.<name>.path in config.yaml)")
