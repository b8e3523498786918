"""The model organism: a tiny Qwen2-VL trained on a synthetic visual question-answering task,
so that evaluation tables measure something (task accuracy) rather than noise around random weights."""
