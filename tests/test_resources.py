"""Scheduler resources of the rules: host memory per job from the model's parameter count or the config."""
import math

import pytest
from safetensors import safe_open

from vlmquant.errors import VlmquantError
from vlmquant.workflow import BASE_MB, job_mem_mb, model_params

MODEL = "demo-qwen2vl"


def test_memory_estimate_from_model_size(demo_model_path):
    n = 0
    for file in demo_model_path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            n += sum(f.get_tensor(k).numel() for k in f.keys())
    assert model_params(str(demo_model_path)) == n > 0
    cfg = {"device": "cpu", "models": {MODEL: {"path": str(demo_model_path), "dtype": "auto"}},
           "search": {"layers_per_job": 2, "mem_mb": None}, "export": {"mem_mb": None}, "eval": {"mem_mb": None}}
    fp32_mb = n * 4 / 2**20
    assert job_mem_mb(cfg, MODEL, "export") == job_mem_mb(cfg, MODEL, "grads") == BASE_MB + math.ceil(1.5 * fp32_mb)
    assert job_mem_mb(cfg, MODEL, "search") == BASE_MB + math.ceil(3 * fp32_mb * 2 / 4)  # 2 of the 4 layers
    cfg["device"] = "auto"  # bf16 on a GPU
    assert job_mem_mb(cfg, MODEL, "eval") == BASE_MB + math.ceil(1.5 * fp32_mb / 2)
    cfg["search"]["mem_mb"] = 1234
    assert job_mem_mb(cfg, MODEL, "acts") == job_mem_mb(cfg, MODEL, "search") == 1234
    with pytest.raises(VlmquantError, match=r"/nowhere has no \*.safetensors files"):
        model_params("/nowhere")
