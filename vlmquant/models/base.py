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

    def encode(self, processor, config, row, labels="answer"):
        """One calibration row → processor tensors (batch dim 1) plus labels and masks, shape (1, T).

        `labels` picks the tokens the loss, the gradients and eval read (caption_mask): "answer", each
        assistant turn's text; "turn", the whole assistant turn with the chat template's tokens around it
        (what the MBQ reference labels). Spans come from the conversation's structure (label_spans),
        never from searching the prompt for the answer's tokens.
        """
        order = [i for t in row["turns"] for i in t["images"]]
        if order != list(range(len(row["images"]))):
            raise VlmquantError(f"sample {row['sample_id']}: images must appear in order once each, got {order}")
        images = [decode_image(b, f"sample {row['sample_id']}: {name}") for b, name in zip(row["images"], row["file_names"])]
        messages = self.messages(row["turns"])
        text = processor.apply_chat_template(messages, tokenize=False)
        enc = self.process(processor, text, images)
        ids = enc["input_ids"]
        vision = torch.isin(ids, torch.tensor(self.image_token_ids(config)))
        caption = torch.zeros_like(ids, dtype=torch.bool)
        for start, end in self.label_spans(processor, config, row, messages, text, images, ids[0], labels):
            caption[0, start:end] = True
        enc.update(labels=torch.where(caption, ids, -100), vision_mask=vision, caption_mask=caption)
        return enc

    def label_spans(self, processor, config, row, messages, text, images, ids, labels="answer"):
        """[(start, end)] token ranges of `ids` (the processed `text`) that each assistant turn labels.

        A turn's characters are located by rendering the conversation up to it: the generation prompt
        of messages[:k] is a prefix of `text`, the turn's text follows it and ends with what the template
        writes after the content (the answer is the turn's last occurrence of its stripped text, so
        template text inserted before it, such as an empty <think> block, is skipped). Characters map to
        tokens by processing the text up to that point with the images before it and counting its tokens
        other than image tokens (processors may give an image fewer tokens when a sample has more images,
        as LLaVA-OneVision does); a token straddling a boundary belongs to the span. Raises VlmquantError (naming the sample) where the template does not
        render a conversation's prefix as the start of the whole, or drops the answer.
        """
        sid, spans = row["sample_id"], []

        def render(msgs, prompt):
            return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

        def prefix(msgs, prompt):
            head = render(msgs, prompt)
            if not text.startswith(head):
                raise VlmquantError(f"sample {sid}: the {self.family} chat template does not render the conversation "
                                    f"before an assistant turn as the start of the whole; cannot place its labels")
            return len(head)

        n_images = 0
        for k, turn in enumerate(row["turns"]):
            if turn["role"] != "assistant":
                n_images += len(turn["images"])
                continue
            answer = turn["text"].strip()
            open_ = prefix(messages[:k], True)
            own = render(messages[:k + 1], False)
            rel = own.rfind(answer) if answer else -1
            suffix = own[rel + len(answer):]
            a = text.find(answer + suffix, open_) if rel >= 0 else -1
            if a < 0:
                raise VlmquantError(f"sample {sid}: the {self.family} chat template does not show assistant turn {k}'s "
                                    f"text {answer[:40]!r} where the turn is rendered")
            if labels == "turn":
                first, last = prefix(messages[:k], False), a + len(answer) + len(suffix)
            else:
                first, last = a, a + len(answer)
            imgs = images[:n_images]
            spans.append((self.token_count(processor, config, text[:first], imgs, ids, straddle=False),
                          self.token_count(processor, config, text[:last], imgs, ids, straddle=True)))
        return spans

    def token_count(self, processor, config, head, images, ids, straddle):
        """Position in `ids` after the text prefix `head`: its non-image tokens are matched against those of
        `ids` (all of them where they agree; else the common prefix, plus the straddling token when
        `straddle`) and the position is taken after that many non-image tokens of `ids`."""
        image_ids = torch.tensor(self.image_token_ids(config))
        own = self.process(processor, head, images)["input_ids"][0]
        own = own[~torch.isin(own, image_ids)]
        text_pos = (~torch.isin(ids, image_ids)).nonzero()[:, 0]
        n = min(len(own), len(text_pos))
        same = int((own[:n] == ids[text_pos[:n]]).int().cumprod(0).sum())
        m = same if same == len(own) or not straddle else same + 1
        return int(text_pos[m - 1]) + 1 if m else 0

    def process(self, processor, text, images):
        """Processor tensors of one sample (batch dim 1). Tensors other than per-token ones must
        concatenate along dim 0 into the batch the model takes (io.ragged.collate)."""
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))

    # --- demo --------------------------------------------------------------------------------
    def demo(self):
        """(transformers config, processor) of the family's tiny random-init demo model (models/tiny.py's
        sizes and tokenizer), built offline."""
        raise NotImplementedError(f"family {self.family} has no demo model")


def check_model_folder(path):
    p = Path(path)
    if not (p / "config.json").is_file():
        raise VlmquantError(f"{path}: model folder not found or has no config.json (models.<name>.path in config.yaml)")
