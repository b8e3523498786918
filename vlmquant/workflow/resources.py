"""Resources and memory the rules ask the scheduler for: GPUs per job, and host memory per job from the
config's `<section>.mem_mb` or an estimate from the model's parameter count (safetensors headers)."""
import functools
import math
from pathlib import Path

from vlmquant.errors import VlmquantError
from vlmquant.io.model_folder import safetensors_header
from vlmquant.workflow.inputs import demo_output, model_depth

BASE_MB = 4000  # Python, torch (with the CUDA context), the calibration inputs
MEM_KEY = {"grads": "search", "acts": "search", "search": "search", "export": "export", "eval": "eval"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def gpus_per_job(config):
    """GPUs a model job asks the scheduler for: none when the config runs models on the CPU."""
    return 0 if config["device"] == "cpu" else 1


def lmms_gpus(config):
    """GPUs an lmms-eval job asks the scheduler for: none when the config runs models on the CPU."""
    return 0 if config["device"] == "cpu" else config["lmms_eval"]["gpus"]


@functools.cache
def model_params(path):
    """Parameter count from the safetensors headers of a model folder (0 for a demo model not built yet)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files and demo_output(path):
        return 0  # a demo model not built yet; it is a few MB
    if not files:
        raise VlmquantError(f"config: models: {path} has no *.safetensors files (model folder missing?)")
    # the header checked against the file's size: a truncated shard is one line naming it, not a traceback
    return sum(math.prod(t["shape"]) for file in files for k, t in safetensors_header(file).items()
               if k != "__metadata__")


def job_mem_mb(config, model, stage):
    """Host memory (MB) of a `stage` job of `model`: the config's `<section>.mem_mb`, else an estimate.

    Jobs that load the whole model (grads, acts, export, eval) hold its weights in host memory
    while loading or saving, in the compute dtype (fp32 on CPU, bf16 on GPU unless the model sets
    `dtype`); a search job holds only its chunk of layers plus their activations.
    """
    fixed = config[MEM_KEY[stage]].get("mem_mb")
    if fixed is not None:
        return fixed
    cfg = config["models"][model]
    dtype = cfg.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float32" if config["device"] == "cpu" else "bfloat16"
    weights_mb = model_params(cfg["path"]) * DTYPE_BYTES[dtype] / 2**20
    if stage == "search":
        return BASE_MB + math.ceil(3 * weights_mb * min(config["search"]["layers_per_job"] / model_depth(cfg), 1))
    return BASE_MB + math.ceil(1.5 * weights_mb)
