"""Checkpoints: fold a scale cache, quantize the decoder linears, save a Hugging Face folder."""
from vlmquant.export.checkpoint import QUANT_FILE, SCALES_FILE, export_checkpoint, quantize_in_memory, read_quant_info

__all__ = ["QUANT_FILE", "SCALES_FILE", "export_checkpoint", "quantize_in_memory", "read_quant_info"]
