# Config validation, wildcard constraints and the input/param functions of every rule.
import os
import re

from vlmquant.workflow import check_config, targets

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
    return config["calib"][wildcards.calib]


def calib_sources(wildcards):
    cfg = config["calib"][wildcards.calib]
    files = {"captions": cfg["captions"], "images": cfg["images"]}
    if cfg["format"] == "interleave":
        files["text"] = cfg["text"]
    return files
