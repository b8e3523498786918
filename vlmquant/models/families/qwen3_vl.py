"""Qwen3-VL: a ViT (patch 16, 2x2 merge) feeding a Qwen3 decoder (q_norm/k_norm, interleaved M-RoPE),
plus deepstack: features of several vision blocks are added to the hidden states at the image
positions after the first decoder layers (Qwen3VLTextModel._deepstack_process, transformers 5.24).

Deepstack is no argument of a decoder layer: the language model adds deepstack_visual_embeds[i] at
visual_pos_masks after layer i. `layer_additions` gives these so that a layer run alone (acts, a
search chunk, distort) gets what the full model feeds it. q_norm/k_norm sit after q/k_proj, so the
input_layernorm → q, k, v fold stays exact.
"""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.families.qwen2_vl import QWEN_IMAGE, qwen_tokenizer, qwen_vision_ids
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import TEXT_SIZES, chatml_template

# the demo's vision tower: patch 16, 2x2 merge, a learned 8x8 position grid (interpolated), merged to the text width
QWEN3_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=TEXT_SIZES["hidden_size"],
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)


def qwen3_image_processor():
    # 64x64 to 224x224 pixels (multiples of 32): 4 to 49 merged tokens per image
    return transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": 64 * 64, "longest_edge": 224 * 224},
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)


def qwen3_processor(tokenizer):
    """The Qwen3VLProcessor of the Qwen3-VL and Qwen3.5 demos (image-only: no torchvision here)."""
    return image_only(transformers.Qwen3VLProcessor)(
        image_processor=qwen3_image_processor(), tokenizer=tokenizer, chat_template=chatml_template(QWEN_IMAGE))


def qwen3_text_config(tokenizer, **extra):
    # head_dim 64 = 32 rotary frequencies in interleaved M-RoPE sections (t, h, w)
    return dict(vocab_size=len(tokenizer), **TEXT_SIZES, head_dim=64, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "mrope_interleaved": True,
                                 "rope_theta": 5e6}, **extra)


class Qwen3VL(Adapter):
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    video_processor = "Qwen3VLVideoProcessor"

    def layer_additions(self, text_kwargs):
        """Deepstack: after decoder layer i, hidden[visual_pos_masks] += deepstack_visual_embeds[i]."""
        embeds = text_kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return {}
        return {i: (text_kwargs["visual_pos_masks"], e) for i, e in enumerate(embeds)}

    def demo(self):
        tokenizer = qwen_tokenizer()
        # deepstack: the features after vision blocks 0 and 1 are added after decoder layers 0 and 1
        config = transformers.Qwen3VLConfig(
            text_config=qwen3_text_config(tokenizer), vision_config=dict(**QWEN3_VISION, deepstack_visual_indexes=[0, 1]),
            tie_word_embeddings=False, **qwen_vision_ids(tokenizer))
        return config, qwen3_processor(tokenizer)


ADAPTER = Qwen3VL()
