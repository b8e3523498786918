"""LLaVA-OneVision: SigLIP features of AnyRes tiles plus newline embeddings, into a Qwen2 decoder."""
from vlmquant.errors import VlmquantError
from vlmquant.models.base import Adapter
from vlmquant.models.llava import LLAVA_LAYER_PREFIXES


class LlavaOnevision(Adapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    checkpoint_layer_prefixes = LLAVA_LAYER_PREFIXES

    def process(self, processor, text, images):
        """A sample's images go to the processor as one group (batch_num_images = [n]): a single
        image is cut into AnyRes tiles, each of several images is one tile, as OneVision does.

        The processor returns pixel_values (n_images, n_tiles, 3, H, W), which does not
        concatenate across samples with other tile counts. Within one sample no image is padded
        (one image, or one tile each), so the tiles are stored flattened to (n_images * n_tiles,
        3, H, W): the model takes that form too, splitting it by the tile counts of image_sizes.
        """
        enc = dict(processor(text=[text], images=[images] if images else None, return_tensors="pt"))
        if images:
            pixels = enc["pixel_values"]
            if len(images) > 1 and pixels.shape[1] != 1:
                raise VlmquantError(f"{self.family}: the processor cut {len(images)} images of one sample into "
                                    f"{pixels.shape[1]} tiles each; expected one tile per image")
            enc["pixel_values"] = pixels.flatten(0, 1)
        return enc
