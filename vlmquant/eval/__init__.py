"""Eval tables: the fp reference and quantized checkpoints measured on a held-out calibration set."""
