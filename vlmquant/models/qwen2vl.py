"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merging feeding a Qwen2 decoder (M-RoPE)."""
from vlmquant.models.base import Adapter


class Qwen2VL(Adapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"


class Qwen25VL(Adapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
