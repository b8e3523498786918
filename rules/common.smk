# Config validation, wildcard constraints and the input/param functions of every rule.
import os
import re

from vlmquant.workflow import calib_params, check_config, layer_file, n_layers, search_chunks, targets

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
