"""Offline demo: calibration data from photos shipped in pip packages, tiny random-init VLMs."""
from vlmquant.demo.dataset import load_captions, load_corpus, write_demo_data
from vlmquant.demo.model import DEMO_PROMPT, FAMILIES, build_demo_model, make_demo_model

__all__ = ["DEMO_PROMPT", "FAMILIES", "build_demo_model", "load_captions", "load_corpus", "make_demo_model",
           "write_demo_data"]
