"""Modality-balanced quantization (MBQ) of vision-language models."""

__version__ = "0.1.0"
