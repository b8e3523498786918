"""InternVL (transformers' native InternVLForConditionalGeneration, the "-hf" checkpoints): InternViT
tiles, pixel-shuffled and projected into a Qwen2 (or Llama) decoder.

pixel_values are all tiles of all images, (n_tiles, 3, H, W), filled into the <IMG_CONTEXT>
tokens in order, so they concatenate across samples as they are. The original remote-code
checkpoints (model_type internvl_chat, InternLM2 decoders) have another model_type and no adapter.
"""
import transformers

from vlmquant.models.base import Adapter
from vlmquant.models.families.llava import LLAVA_LAYER_PREFIXES
from vlmquant.models.families.qwen2_vl import QWEN_TOKENS
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import TEXT_SIZES, VISION_SIZES, chatml_template, make_tokenizer


class InternVL(Adapter):
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    video_processor = "InternVLVideoProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES  # saved like LLaVA: language_model.model.layers

    def demo(self):
        named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        tokenizer = make_tokenizer(QWEN_TOKENS[:3] + tuple(named.values()), eos="<|im_end|>", pad="<|endoftext|>",
                                   named=named)
        # InternViT on 112x112 tiles: 8x8 patches, pixel-shuffled by 0.5 to 4x4 = 16 tokens per tile;
        # an image becomes up to 4 tiles plus a thumbnail
        config = transformers.InternVLConfig(
            vision_config=dict(**VISION_SIZES, image_size=[112, 112], patch_size=[14, 14]),
            text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            image_token_id=tokenizer.context_image_token_id, image_seq_length=16, downsample_ratio=0.5,
            tie_word_embeddings=False)
        image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 112, "width": 112},
                                                                crop_to_patches=True, max_patches=4)
        processor = image_only(transformers.InternVLProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
            chat_template=chatml_template("<IMG_CONTEXT>\n"))
        return config, processor


ADAPTER = InternVL()
