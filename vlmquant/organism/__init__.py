"""The model organism: a tiny Qwen2-VL trained on a synthetic visual question-answering task,
so that evaluation tables measure something (task accuracy) rather than noise around random weights.

MODEL_DIR is the trained model shipped in the package (weights, processor, training.json)."""
from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
