"""Pseudo-quantized checkpoints: fold a scale cache, fake-quantize decoder linears, save an HF folder."""
from vlmquant.export.checkpoint import (QUANT_FILE, SCALES_FILE, check_scale_cache, export_checkpoint,
                                       quantize_in_memory, read_quant_info, resolve_ignore)

__all__ = ["QUANT_FILE", "SCALES_FILE", "check_scale_cache", "export_checkpoint", "quantize_in_memory",
           "read_quant_info", "resolve_ignore"]
