"""InternVL (transformers' native InternVLForConditionalGeneration, the "-hf" checkpoints): InternViT
tiles, pixel-shuffled and projected into a Qwen2 (or Llama) decoder.

pixel_values are all tiles of all images, (n_tiles, 3, H, W), filled into the <IMG_CONTEXT>
tokens in order, so they concatenate across samples as they are. The original remote-code
checkpoints (model_type internvl_chat, InternLM2 decoders) are refused by Adapter.check_folder.
"""
from vlmquant.models.base import Adapter
from vlmquant.models.llava import LLAVA_LAYER_PREFIXES


class InternVL(Adapter):
    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES  # saved like LLaVA: language_model.model.layers
