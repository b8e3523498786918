"""An MBQ NVFP4 W4A4 run through every stage of the demo workflow with Snakemake, to its packed folder and eval."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vlmquant import paths
from vlmquant.eval.table import read_table
from vlmquant.io.scales import load_cache

pytestmark = pytest.mark.slow

RUN = "mbq-nvfp4"
IDS = {"model": "demo-qwen2vl", "calib": "demo", "run": RUN}


def test_mbq_nvfp4_w4a4_runs_to_a_packed_folder_and_an_eval(pipe, tmp_path):
    workdir = pipe.copy(tmp_path)  # calib, inputs, grads, acts and the fp eval done
    workdir.edit(lambda c: c["runs"].update({RUN: {"method": "mbq", "w_bit": 4, "w_type": "nvfp4", "a_bit": 4}}))
    packed, eval_table = paths.PACKED.format(**IDS), paths.EVAL.format(**IDS)
    workdir.snakemake(packed, eval_table)
    cache = load_cache(workdir.file(paths.SCALE_CACHE.format(**IDS)))
    amax = cache["meta"]["input_amax"]
    assert len(amax) == 4 * 7 and all(v > 0 for v in amax.values())
    folder = workdir.file(packed)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    stored = {}
    for f in folder.glob("model*.safetensors"):
        stored.update(load_file(f))
    evaluated = read_table(workdir.file(eval_table))[1]["quantization"]
    for name, gs in evaluated["input_global_scales"].items():  # the eval and the packed folder: one scale
        key = f"model.{name}.input_global_scale"
        assert stored[key].dtype == torch.float32 and stored[key].item() == gs
    for layer in range(4):
        q, k, v = (stored[f"model.layers.{layer}.self_attn.{p}_proj.weight_global_scale"] for p in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v)
    assert workdir.file(eval_table).stat().st_size > 0
