"""LLaVA-OneVision: SigLIP features of AnyRes tiles plus newline embeddings, into a Qwen2 decoder."""
import transformers

from vlmquant.errors import VlmquantError
from vlmquant.models.base import Adapter
from vlmquant.models.families.llava import LLAVA_LAYER_PREFIXES
from vlmquant.models.families.qwen2_vl import QWEN_TOKENS
from vlmquant.models.processing import image_only
from vlmquant.models.tiny import TEXT_SIZES, VISION_SIZES, chatml_template, make_tokenizer


class LlavaOnevision(Adapter):
    model_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    video_processor = "LlavaOnevisionVideoProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES

    def process(self, processor, text, images, **kwargs):
        """A sample's images go to the processor as one group (batch_num_images = [n]): a single
        image is cut into AnyRes tiles, each of several images is one tile, as OneVision does.

        The processor returns pixel_values (n_images, n_tiles, 3, H, W), which does not
        concatenate across samples with other tile counts. Within one sample no image is padded
        (one image, or one tile each), so the tiles are stored flattened to (n_images * n_tiles,
        3, H, W): the model takes that form too, splitting it by the tile counts of image_sizes.
        """
        enc = dict(processor(text=[text], images=[images] if images else None, return_tensors="pt", **kwargs))
        if images:
            pixels = enc["pixel_values"]
            if len(images) > 1 and pixels.shape[1] != 1:
                raise VlmquantError(f"{self.family}: the processor cut {len(images)} images of one sample into "
                                    f"{pixels.shape[1]} tiles each; expected one tile per image")
            enc["pixel_values"] = pixels.flatten(0, 1)
        return enc

    def demo(self):
        tokenizer = make_tokenizer(QWEN_TOKENS[:3] + ("<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>")
        # SigLIP on 56x56 tiles (4x4 = 16 tokens each), AnyRes grids of up to 2x2 tiles
        pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
        config = transformers.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **VISION_SIZES, image_size=56, patch_size=14),
            text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), **TEXT_SIZES, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
        image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56},
                                                                       image_grid_pinpoints=pinpoints)
        processor = image_only(transformers.LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
            vision_feature_select_strategy="full", chat_template=chatml_template("<image>\n"))
        return config, processor


ADAPTER = LlavaOnevision()
