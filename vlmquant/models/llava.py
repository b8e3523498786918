"""LLaVA-1.5: CLIP ViT features (second-to-last layer, CLS dropped) projected into a Llama decoder.

Prompts read "USER: <image>\\nprompt ASSISTANT: caption", so a caption's first token carries the
space before it (base.caption_mask tries the caption with a leading space). The image token is
the config's `image_token_index`, which transformers also exposes as `image_token_id`.
"""
from vlmquant.models.base import Adapter

# transformers 5 names first; checkpoints saved by transformers 4 or 5 (it writes the old layout)
# keep the decoder under language_model.model. The original LLaVA repo's layout (model.layers,
# model.mm_projector) is not a LlavaForConditionalGeneration checkpoint and is not accepted.
LLAVA_LAYER_PREFIXES = ("model.language_model.layers", "language_model.model.layers")


class Llava(Adapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES
