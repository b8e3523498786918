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
from vlmquant.io.model_folder import load_whole
from vlmquant.models.processing import load_processor


@dataclass(frozen=True)
class ScaleGroup:
    """One scale search: `prev`'s output is divided by s, the input columns of `linears` (and `scaled`) multiplied.

    Names are relative to a decoder layer; a name is a module (an nn.Linear, a norm) or, for fused
    mixture-of-experts weights, a 3-D parameter (E, out, in) such as `mlp.experts.gate_up_proj`.
    The loss compares the output of `block`. `site` picks the reweight ratio ρ ("attn" or "mlp").
    `token_wise`: each token's block output depends on that token's input only (an MLP, a linear, a
    MoE block; not attention), so the search may run the block on just the tokens its loss reads.
    `scaled`: consumers of prev's output that are scaled with the group but never quantized (a MoE
    router, a sigmoid gate): their columns × s keep the fp function, and in the search they compute
    exactly as in fp (W·s applied to x/s), so only `linears` are quantized there.
    `inputs`: the module whose first input is the group's input x (default: linears[0]).
    `experts`: the per-expert group of fused experts: prev = gate_up_proj (E, 2I, H), whose up rows
    [I, 2I) of expert e are divided by s_e; linears = (down_proj (E, H, I),); block = the experts
    module; each expert is searched on the tokens routed to it, scales (E, I) (vlmquant.search.experts).
    """
    prev: str
    linears: tuple[str, ...]
    block: str
    site: str
    token_wise: bool = False
    scaled: tuple[str, ...] = ()
    inputs: str | None = None
    experts: bool = False

    @property
    def consumers(self):
        """Every name whose input columns folding multiplies by s (what a scale cache entry lists)."""
        return (*self.linears, *self.scaled)


# Scale groups by the kind of each part of a decoder layer (Adapter.layer_kinds): Llama / Qwen2-style names.
ATTENTION = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "attn"),
    # only where v_proj's output width equals o_proj's input width (no grouped-query attention)
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "attn", token_wise=True),
)
MLP = (
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "mlp", token_wise=True),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp", token_wise=True),
)
# Fused experts (transformers 5: mlp.gate, a router with a bare (E, H) weight; mlp.experts.gate_up_proj
# (E, 2I, H), gate rows first; mlp.experts.down_proj (E, H, I)), as AWQ does mixtures of experts: the
# norm feeds the router and every expert's gate/up (loss on the whole MoE block output); each expert's
# up rows feed its down_proj (loss on that expert's output, over the tokens routed to it).
MOE = (
    ScaleGroup("post_attention_layernorm", ("mlp.experts.gate_up_proj",), "mlp", "mlp", token_wise=True,
               scaled=("mlp.gate",), inputs="mlp"),
    ScaleGroup("mlp.experts.gate_up_proj", ("mlp.experts.down_proj",), "mlp.experts", "mlp", token_wise=True,
               experts=True, inputs="mlp.experts"),
)
LLAMA_GROUPS = {"attention": ATTENTION, "mlp": MLP}


class Adapter:
    """Base of every family's adapter. Subclasses set the class names and override what differs."""
    model_class: str  # transformers class name; its config's model_type is the family name
    processor_class: str
    video_processor: str | None = None  # what AutoProcessor builds where torchvision is installed (demo config)
    groups: dict[str, tuple[ScaleGroup, ...]] = LLAMA_GROUPS  # by layer kind (layer_kinds)
    # gradients are taken at these outputs: the first name a decoder layer has (no o_proj in a linear-attention
    # layer, no down_proj in a MoE layer; the block's output is the same tensor as its last linear's)
    attn_out = ("self_attn.o_proj", "linear_attn.out_proj")
    mlp_out = ("mlp.down_proj", "mlp")
    # decoder linears that are scaled with their group but never quantized (routers' gates, tiny gating
    # projections), relative to a decoder layer
    keep_fp: tuple[str, ...] = ()
    # fused 3-D expert weights (E, out, in) quantized per expert like a stack of linears, where a layer has them
    expert_weights = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    # the per-expert linears each fused expert weight is packed as, its output rows split evenly in this order
    # (gate rows first), under the names vLLM and per-expert checkpoints use: experts.{e}.gate_proj, …
    expert_linears = {"mlp.experts.gate_up_proj": ("gate_proj", "up_proj"), "mlp.experts.down_proj": ("down_proj",)}
    # checkpoint layouts of fused experts the lazy loader reads (models.loading.Checkpoint.load_into):
    # "fused" as the module holds them, "transposed" (E, in, out), "per_expert" (experts.{e}.gate_proj.weight, …)
    expert_layouts: tuple[str, ...] = ("fused",)
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
        (dequantized on load: the call that loads every scheme in transformers 5.23-5.24). Raises VlmquantError when
        transformers leaves a weight unset (io.model_folder.load_whole)."""
        config = self.check_folder(path)
        cls = getattr(transformers, self.model_class)
        kwargs = {}
        if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
            kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
        model = load_whole(cls, path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
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

    def layer_kinds(self, layer):
        """The kinds of a decoder layer's parts, keys of `groups`: its token mixer ("attention" or
        "linear_attention") and its MLP ("mlp" or "moe"). transformers builds each layer from the config
        (Qwen3.5's config.layer_types, the MoE placement rule of mlp_only_layers / decoder_sparse_step), so
        the modules a layer holds say its kind."""
        mixer = "linear_attention" if hasattr(layer, "linear_attn") else "attention"
        return mixer, "moe" if hasattr(getattr(layer, "mlp", None), "experts") else "mlp"

    def layer_groups(self, layer, index=0):
        """(groups that apply to this layer, [(group, why not)] for the others), checked against its modules.

        The groups are `groups[kind]` for each of the layer's kinds; a layer kind without groups, or a
        group naming a module the layer lacks, is a VlmquantError naming the layer.
        """
        out, skipped = [], []
        for kind in self.layer_kinds(layer):
            if kind not in self.groups:
                raise VlmquantError(f"{self.family}: decoder layer {index} is a {kind} layer, which this adapter has "
                                    f"no scale groups for")
            for g in self.groups[kind]:
                for n in (g.prev, *g.consumers, g.block, *([g.inputs] if g.inputs else [])):
                    try:
                        layer_part(layer, n)
                    except AttributeError:
                        raise VlmquantError(f"{self.family}: decoder layer {index} has no module '{n}'") from None
                why = group_mismatch(layer, g)
                if why:
                    skipped.append((g, why))
                else:
                    out.append(g)
        return out, skipped

    def resolve_groups(self, layer, index=0):
        """The groups that apply to this layer (layer_groups without the skipped ones)."""
        return self.layer_groups(layer, index)[0]

    def skipped_groups(self, layer, index=0):
        """[{"prev", "linears", "reason"}] of the layer's groups that do not apply, for the search records."""
        return [{"prev": g.prev, "linears": list(g.consumers), "reason": why}
                for g, why in self.layer_groups(layer, index)[1]]

    def site(self, layer, names):
        """The first of `names` (attn_out or mlp_out) the decoder layer has."""
        for n in names:
            try:
                return layer.get_submodule(n)
            except AttributeError:
                continue
        raise VlmquantError(f"{self.family}: decoder layer has none of {', '.join(names)} to take gradients at")

    def layer_additions(self, text_kwargs):
        """{layer index i: (mask (B, T), values (N, C))} the language model adds to the hidden states after
        decoder layer i, hidden[mask] += values, given the keyword arguments it was called with. None here;
        Qwen3-VL's deepstack adds vision features after its first layers."""
        return {}

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
        enc = self.process(processor, text, images, **no_second_bos(processor.tokenizer, text))
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
        own = self.process(processor, head, images, **no_second_bos(processor.tokenizer, head))["input_ids"][0]
        own = own[~torch.isin(own, image_ids)]
        text_pos = (~torch.isin(ids, image_ids)).nonzero()[:, 0]
        n = min(len(own), len(text_pos))
        same = int((own[:n] == ids[text_pos[:n]]).int().cumprod(0).sum())
        m = same if same == len(own) or not straddle else same + 1
        return int(text_pos[m - 1]) + 1 if m else 0

    def process(self, processor, text, images, **kwargs):
        """Processor tensors of one sample (batch dim 1). Tensors other than per-token ones must
        concatenate along dim 0 into the batch the model takes (io.ragged.collate). kwargs go to the
        processor (add_special_tokens)."""
        return dict(processor(text=[text], images=images or None, return_tensors="pt", **kwargs))

    # --- demo --------------------------------------------------------------------------------
    def demo(self):
        """(transformers config, processor) of the family's tiny random-init demo model (models/tiny.py's
        sizes and tokenizer), built offline."""
        raise NotImplementedError(f"family {self.family} has no demo model")


def no_second_bos(tokenizer, text):
    """{"add_special_tokens": False} when the rendered chat template already starts with the tokenizer's bos
    token (Gemma, LLaVA templates write it, and their tokenizers add one when encoding: <bos><bos>); {} otherwise.
    transformers' own tokenizing apply_chat_template does the same (processing_utils.py)."""
    bos = tokenizer.bos_token
    return {"add_special_tokens": False} if bos and text.startswith(bos) else {}


def layer_part(layer, name):
    """The module or (fused experts) parameter `name` of a decoder layer; AttributeError if it has none."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return layer.get_parameter(name)


def in_width(part):
    """Input channels of a consumer: an nn.Linear, a module with a weight (out, in) (a router), a (E, out, in)
    parameter."""
    if isinstance(part, torch.nn.Linear):
        return part.in_features
    return (part if isinstance(part, torch.Tensor) else part.weight).shape[-1]


def group_mismatch(layer, g):
    """None if the group's widths fit (prev's output channels are its consumers' inputs), else why not."""
    prev = layer_part(layer, g.prev)
    widths = {in_width(layer_part(layer, n)) for n in g.consumers}
    if len(widths) > 1:
        return f"{', '.join(g.consumers)} take different input widths {sorted(widths)}"
    n = widths.pop()
    if g.experts:
        out = prev.shape[-2] // 2  # the up rows of gate_up_proj
    elif isinstance(prev, torch.nn.Linear):
        out = prev.out_features
    else:  # a norm: one weight per channel, or one shared by every head (s must then repeat per head)
        d = prev.weight.numel()
        return None if n % d == 0 else f"{g.prev} has {d} weights, {n} is not a multiple"
    if out != n:
        return (f"{g.prev} outputs {out} channels, {', '.join(g.linears)} take {n} "
                f"(grouped-query attention: no exact per-channel fold)")
    return None


def check_model_folder(path):
    p = Path(path)
    if not (p / "config.json").is_file():
        raise VlmquantError(f"{path}: model folder not found or has no config.json (models.<name>.path in config.yaml)")
