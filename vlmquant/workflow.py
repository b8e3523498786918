"""Glue between Snakemake and the library: config checks, targets, script entry points."""
import contextlib
import functools
import json
import logging
import math
import re
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

from vlmquant.errors import VlmquantError


def check_config(config, schema_path):
    """Validate against the schema (one-line error naming the key), fill defaults, cross-check names."""
    import jsonschema
    from snakemake.utils import validate

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise VlmquantError(f"config: {key}: {error.message}")
    validate(config, str(schema_path), set_default=True)
    for name, run in config["runs"].items():
        if run["method"] != "mbq" and run.get("reweight"):
            raise VlmquantError(f"config: runs.{name}.reweight: only mbq reweights")
        if run["method"] == "smoothquant" and "a_bit" not in run:
            raise VlmquantError(f"config: runs.{name}.a_bit: smoothquant smooths activations for quantization; "
                                "set a_bit (e.g. 8 for W8A8)")
        if run["method"] != "smoothquant" and "alpha" in run:
            raise VlmquantError(f"config: runs.{name}.alpha: only smoothquant takes alpha (mbq and awq search it)")
        if run["method"] == "smoothquant":
            run.setdefault("alpha", 0.5)
        if run.get("distort") and run["method"] == "rtn":
            raise VlmquantError(f"config: runs.{name}.distort: rtn has no search to feed quantized inputs to")
        if not run.get("distort"):
            run.pop("distort", None)  # false and absent are one setting (and one set of rule params)
        run.setdefault("reweight", run["method"] == "mbq")
    for kind in ("models", "calib", "runs"):
        for name in config["targets"].get(kind, []):
            if name not in config[kind]:
                raise VlmquantError(f"config: targets.{kind}: {name!r} is not defined under '{kind}'")
    for name, cfg in config["calib"].items():
        if cfg["format"] == "interleave" and "text" not in cfg:
            raise VlmquantError(f"config: calib.{name}.text: format interleave needs a text corpus file")
    return config


def calib_params(cfg):
    """The calibration settings that affect the Parquet (the text corpus only for interleave)."""
    unused = () if cfg["format"] == "interleave" else ("text", "interleave_tokens")
    return {k: v for k, v in cfg.items() if k not in unused}


def targets(config):
    """Files `rule all` asks for: the summary table and plots (which need every stage before them)."""
    from vlmquant.report.layout import final_targets

    return final_targets(config)


def n_layers(model_cfg):
    """Decoder layers of a model, from its config.json, or from the demo builder for demo paths."""
    path = Path(model_cfg["path"])
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        return cfg.get("text_config", cfg)["num_hidden_layers"]
    if path.parts[:2] == ("results", "demo"):
        from vlmquant.demo.model import TEXT_SIZES
        return TEXT_SIZES["num_hidden_layers"]
    raise VlmquantError(f"config: models: {path} has no config.json (model folder missing?)")


def search_chunks(config):
    """(model, first layer, end layer) of every search job."""
    per_job = config["search"]["layers_per_job"]
    out = []
    for name, cfg in config["models"].items():
        L = n_layers(cfg)
        out += [(name, a, min(a + per_job, L)) for a in range(0, L, per_job)]
    return out


def layer_file(model, start):
    return f"results/{model}/{{calib}}/{{run}}/scales/layer_{start:03d}.safetensors"


def boundary_file(model, layer):
    """Inputs of `layer` as a distort run's quantized layers compute them, left by the chunk before it."""
    return f"results/{model}/{{calib}}/{{run}}/distorted/layer_{layer:03d}.safetensors"


def distort_modes(config):
    """Kinds of search jobs the runs need: False (chunks start from fp inputs), True (distort chains)."""
    return sorted({bool(run.get("distort")) for run in config["runs"].values() if run["method"] != "rtn"})


def runs_with(config, distort):
    """Wildcard pattern of the runs with (or without) `distort`."""
    return "|".join(re.escape(n) for n, run in config["runs"].items() if bool(run.get("distort")) == distort) or "NONE"


def chunk_start(start, first):
    """File with the inputs of a chunk's first layer: `start` itself, or its file in an acts folder."""
    start = Path(start)
    return start / f"layer_{first:03d}.safetensors" if start.is_dir() else start


@contextlib.contextmanager
def script_logging(snakemake):
    """Route logging and stderr (tqdm) to the rule's log; turn VlmquantError into a one-line exit."""
    log_path = snakemake.log[0] if snakemake.log else None
    stream = open(log_path, "w") if log_path else sys.stderr
    handler = logging.StreamHandler(stream)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    real_stderr = sys.stderr
    sys.stderr = stream
    try:
        yield
    except VlmquantError as e:
        print(f"error: {e}", file=stream)
        print(f"error: {e}", file=real_stderr)
        sys.exit(1)
    finally:
        sys.stderr = real_stderr
        if log_path:
            stream.close()


# --- scheduler resources ------------------------------------------------------------------------
BASE_MB = 4000  # Python, torch (with the CUDA context), the calibration inputs
MEM_KEY = {"grads": "search", "acts": "search", "search": "search", "export": "export", "eval": "eval"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def gpus_per_job(config):
    """GPUs a model job asks the scheduler for: none when the config runs models on the CPU."""
    return 0 if config["device"] == "cpu" else 1


@functools.cache
def model_params(path):
    """Parameter count from the safetensors headers of a model folder (0 for a demo model not built yet)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files and Path(path).parts[:2] == ("results", "demo"):
        return 0  # the demo models are a few MB
    if not files:
        raise VlmquantError(f"config: models: {path} has no *.safetensors files (model folder missing?)")
    n = 0
    for file in files:
        with safe_open(file, "np") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return n


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
        return BASE_MB + math.ceil(3 * weights_mb * min(config["search"]["layers_per_job"] / n_layers(cfg), 1))
    return BASE_MB + math.ceil(1.5 * weights_mb)
