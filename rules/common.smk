# Config validation, wildcard constraints and the input/param functions of every rule.
import os
import re

from vlmquant.workflow import (boundary_file, calib_params, check_config, distort_modes, gpus_per_job, job_mem_mb, layer_file,
                               n_layers, runs_with, search_chunks,
                               targets)

config = check_config(config, os.path.join(os.path.dirname(workflow.main_snakefile), "workflow/schemas/config.schema.yaml"))


wildcard_constraints:
    model="|".join(map(re.escape, config["models"])) or "NONE",
    calib="|".join(map(re.escape, config["calib"])) or "NONE",
    family="[a-z0-9_]+",


def all_targets():
    return targets(config)


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def model_dir(wildcards):
    return config["models"][wildcards.model]["path"]


def calib_cfg(wildcards):
    return calib_params(config["calib"][wildcards.calib])


def calib_sources(wildcards):
    cfg = config["calib"][wildcards.calib]
    files = {"captions": cfg["captions"], "images": cfg["images"]}
    if cfg["format"] == "interleave":
        files["text"] = cfg["text"]
    return files


def run_cfg(wildcards):
    return config["runs"][wildcards.run]


def rule_name(model):
    return re.sub(r"\W", "_", model)


def chunk_starts(wildcards):
    return [a for m, a, _ in search_chunks(config) if m == wildcards.model]


def grads_input(model):
    """Input function of a search job of `model`: the gradients, for runs that reweight."""

    def grads(wildcards):
        if config["runs"][wildcards.run]["reweight"]:
            return f"results/{model}/{wildcards.calib}/grads.safetensors"
        return []

    return grads


def layer_files(wildcards):
    n = n_layers(config["models"][wildcards.model])
    return [f"results/{wildcards.model}/{wildcards.calib}/{wildcards.run}/scales/layer_{i:03d}.safetensors"
            for i in range(n)]


def scale_meta(model):
    """Param function: what every scale file of a run of `model` records, and what merge checks."""

    def meta(wildcards):
        return {"model": model, "calib": wildcards.calib, "run": wildcards.run,
                "run_config": config["runs"][wildcards.run]}

    return meta


def merge_meta(wildcards):
    return scale_meta(wildcards.model)(wildcards)


# --- export → eval → summary (vlmquant/report/layout.py holds the logic) ----------------------
from vlmquant.report import layout

layout.check_eval_config(config)


wildcard_constraints:
    run="|".join(map(re.escape, config["runs"])) or "NONE",
    eval_calib="|".join(map(re.escape, config["calib"])) or "NONE",


def export_inputs(wildcards):
    files = {"model": model_dir(wildcards)}
    if not layout.is_rtn(config["runs"][wildcards.run]):
        files["cache"] = f"results/{wildcards.model}/{wildcards.calib}/{wildcards.run}/scale_cache.pt"
    return files


def export_run(wildcards):
    return layout.export_run(config["runs"][wildcards.run])


def run_names(wildcards):
    return {"model": wildcards.model, "calib": wildcards.calib, "run": wildcards.run}


def run_ids(wildcards):
    return {**run_names(wildcards), "eval_calib": config["eval"]["calib"]}


def eval_inputs(wildcards):
    name = config["eval"]["calib"]
    return {"inputs": f"results/{wildcards.model}/{name}/inputs.safetensors",
            "ref": layout.fp_ref(wildcards.model, name), "model": model_dir(wildcards),
            "checkpoint": layout.checkpoint_dir(wildcards.model, wildcards.calib, wildcards.run)}


def summary_inputs(wildcards):
    return [row["path"] for row in layout.summary_rows(config)]


def plot_inputs(wildcards):
    runs = config["targets"].get("runs", [])
    return {"summary": "results/summary.parquet",
            "evals": [layout.eval_table(wildcards.model, wildcards.calib, r) for r in runs],
            "searches": [f"results/{wildcards.model}/{wildcards.calib}/{r}/search.parquet"
                         for r in layout.search_runs(config)]}


def lmms_command(wildcards, input, output):
    return layout.lmms_eval_command(config["lmms_eval"], config["models"][wildcards.model]["family"],
                                    input[0], f"{output[0]}.tmp")


def host_mem(stage, model=None):
    """Resource function: host memory of a `stage` job of `model` (default: the {model} wildcard)."""

    def resource(wildcards):
        return job_mem_mb(config, model or wildcards.model, stage)

    return resource
