"""Glue between Snakemake and the library: config checks, run specs, search chunks, targets, the
summary's inputs, scheduler resources, and the scripts' logging.

Everything here is a pure function of the validated config (rules/common.smk calls it); paths come
from vlmquant/paths.py. Nothing here imports torch, so the workflow loads fast.
"""
import contextlib
import functools
import logging
import math
import re
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.methods import METHODS
from vlmquant.models import family_names, folder_family, n_layers
from vlmquant.spec import RunSpec

FIGURES = ("hidden_error", "alpha", "metrics")
CHECKPOINTS = {"pseudo": paths.CHECKPOINT, "compressed-tensors": paths.PACKED}  # runs.<name>.formats
EVAL_SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")
LMMS_MODEL = "vlmquant"  # lmms-eval's name of vlmquant.eval.lmms_model (every family); `lmms_eval.model` overrides


# --- config ---------------------------------------------------------------------------------------
def check_choice(key, value, choices):
    """A registry-backed choice (family, method): one line naming the key, as the schema's enums do."""
    if value not in choices:
        raise VlmquantError(f"config: {key}: {value!r} is not one of {sorted(choices)}")


def check_config(config, schema_path):
    """Validate against the schema (one-line error naming the key), fill defaults, cross-check names.

    Fills `models.<name>.family` from the folder when absent, and normalises every run to its
    RunSpec's settings (RunSpec.config), so equal runs give equal rule params.
    """
    import jsonschema
    from snakemake.utils import validate

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise VlmquantError(f"config: {key}: {error.message}")
    validate(config, str(schema_path), set_default=True)
    for name, cfg in config["models"].items():
        if "family" in cfg:
            check_choice(f"models.{name}.family", cfg["family"], family_names())
        else:
            cfg["family"] = folder_family(cfg["path"], f"config: models.{name}.path")
    for name, run in config["runs"].items():
        check_choice(f"runs.{name}.method", run["method"], METHODS)
    for name, run in config["runs"].items():
        # RunSpec.config leaves out formats (no setting of the weights), which says what checkpoints to write
        formats = {"formats": run["formats"]} if "formats" in run else {}
        config["runs"][name] = {**RunSpec.from_config(name, run).config(), **formats}
    for kind in ("models", "calib", "runs"):
        for name in config["targets"].get(kind, []):
            if name not in config[kind]:
                raise VlmquantError(f"config: targets.{kind}: {name!r} is not defined under '{kind}'")
    for name, cfg in config["calib"].items():
        if cfg["format"] == "interleave" and "text" not in cfg:
            raise VlmquantError(f"config: calib.{name}.text: format interleave needs a text corpus file")
    eval_calib = config["eval"]["calib"]
    if eval_calib not in config["calib"]:
        raise VlmquantError(f"config: eval.calib: {eval_calib!r} is not defined under 'calib' "
                            "(name a held-out calibration set, disjoint from the search sets)")
    return config


def run_specs(config):
    """{run name: RunSpec} of a checked config (export.ignore in every spec)."""
    return {name: RunSpec.from_config(name, run, config["export"]["ignore"]) for name, run in config["runs"].items()}


def name_pattern(names):
    """Wildcard constraint matching exactly the given names."""
    return "|".join(map(re.escape, names)) or "NONE"


def calib_params(cfg):
    """The calibration settings that affect the Parquet (the text corpus only for interleave)."""
    unused = () if cfg["format"] == "interleave" else ("text", "interleave_tokens")
    return {k: v for k, v in cfg.items() if k not in unused}


def calib_sources(cfg):
    """The input files of a calibration set."""
    files = {"captions": cfg["captions"], "images": cfg["images"]}
    if cfg["format"] == "interleave":
        files["text"] = cfg["text"]
    return files


def eval_settings(config):
    return {k: config["eval"][k] for k in EVAL_SETTINGS}


def fill(template, wildcards, **extra):
    """A paths template with the job's wildcards (and `extra`) filled in."""
    return template.format(**{**{k: wildcards[k] for k in wildcards.keys()}, **extra})


# --- search chunks --------------------------------------------------------------------------------
def model_depth(model_cfg):
    """Decoder layers of a model: its config.json, or for a demo model not built yet the demo's depth."""
    path = model_cfg["path"]
    if (Path(path) / "config.json").is_file():
        return n_layers(path)
    if Path(path).as_posix() == paths.ORGANISM_MODEL:  # a copy of the packaged organism
        from vlmquant.organism import MODEL_DIR

        return n_layers(MODEL_DIR)
    from vlmquant.models.tiny import TEXT_SIZES  # demo paths only (folder_family has checked the path)

    return TEXT_SIZES["num_hidden_layers"]


def chunks(config, model):
    """[(first layer, end layer)] of the search jobs of `model`, `search.layers_per_job` layers each."""
    per_job, L = config["search"]["layers_per_job"], model_depth(config["models"][model])
    return [(a, min(a + per_job, L)) for a in range(0, L, per_job)]


def chunk_layers(config, model, chunk):
    """The layers of the search job {chunk} of `model`; VlmquantError for a chunk that does not exist."""
    for a, b in chunks(config, model):
        if paths.chunk_id(a) == chunk:
            return list(range(a, b))
    raise VlmquantError(f"search chunk {chunk} does not start a chunk of {model} "
                        f"(search.layers_per_job {config['search']['layers_per_job']})")


def search_start(config, spec, wildcards):
    """Input of a search job with the inputs of its first layer: the fp acts folder, or for a distort
    run's later chunks the previous chunk's folder (its next_inputs), which chains the run's chunks."""
    first = chunk_layers(config, wildcards.model, wildcards.chunk)[0]
    if spec.distort and first > 0:
        previous = [a for a, _ in chunks(config, wildcards.model) if a < first][-1]
        return fill(paths.SCALES, wildcards, chunk=paths.chunk_id(previous))
    return fill(paths.ACTS, wildcards)


def chunk_folders(config, wildcards):
    """The search chunk folders of one run (the merge's inputs)."""
    return [fill(paths.SCALES, wildcards, chunk=paths.chunk_id(a)) for a, _ in chunks(config, wildcards.model)]


# --- targets and the summary ----------------------------------------------------------------------
def target_triples(config):
    t = config["targets"]
    return [(m, c, r) for m in t.get("models", []) for c in t.get("calib", []) for r in t.get("runs", [])]


def targets(config):
    """What `rule all` builds: every target run's scale cache and checkpoints (its formats), the summary table,
    the plots, and the lmms-eval results when enabled."""
    specs = run_specs(config)
    out = [paths.SUMMARY_CSV, paths.SUMMARY_PARQUET]
    for m, c, r in target_triples(config):
        ids = dict(model=m, calib=c, run=r)
        out += [paths.SCALE_CACHE.format(**ids)] if specs[r].has_scales else []
        out += [template.format(**ids) for fmt, template in CHECKPOINTS.items() if fmt in specs[r].formats]
        if config["lmms_eval"]["enabled"]:
            out.append(paths.LMMS.format(**ids))
    t = config["targets"]
    out += [paths.PLOT.format(model=m, calib=c, figure=f) for m in t.get("models", []) for c in t.get("calib", [])
            for f in FIGURES]
    if config["lmms_eval"]["enabled"] and config["lmms_eval"]["include_fp"]:
        out += [paths.LMMS_FP.format(model=m) for m in t.get("models", [])]
    return out


def run_benchmarks(config, model, calib, run):
    """{stage: [benchmark files]} of the jobs that produced one run's eval table."""
    spec = run_specs(config)[run]
    ids = dict(model=model, calib=calib, run=run)
    out = {stage: [paths.BENCHMARKS[stage].format(**ids)] for stage, fmt in (("export", "pseudo"),
                                                                               ("pack", "compressed-tensors"))
           if fmt in spec.formats}
    out["eval"] = [paths.BENCHMARKS["eval"].format(**ids)]
    if spec.searches:
        out["acts"] = [paths.BENCHMARKS["acts"].format(**ids)]
        out["search"] = [paths.BENCHMARKS["search"].format(**ids, chunk=paths.chunk_id(a)) for a, _ in chunks(config, model)]
        if spec.needs_grads:
            out["grads"] = [paths.BENCHMARKS["grads"].format(**ids)]
    return out


def summary_rows(config):
    """Every table of the summary: [{model, calib, run, path, bench, lmms}], the fp row of each model first.
    lmms: the lmms-eval results folder of the row when lmms_eval is enabled (for fp: with include_fp), else None."""
    eval_calib = config["eval"]["calib"]
    lm = config["lmms_eval"]
    rows = []
    for m in config["targets"].get("models", []):
        fp = dict(model=m, eval_calib=eval_calib)
        rows.append({"model": m, "calib": None, "run": "fp", "path": paths.FP_TABLE.format(**fp),
                     "bench": {"eval": [paths.BENCHMARKS["eval_fp"].format(**fp)]},
                     "lmms": paths.LMMS_FP.format(model=m) if lm["enabled"] and lm["include_fp"] else None})
        rows += [{"model": m, "calib": c, "run": r, "path": paths.EVAL.format(model=m, calib=c, run=r),
                  "bench": run_benchmarks(config, m, c, r),
                  "lmms": paths.LMMS.format(model=m, calib=c, run=r) if lm["enabled"] else None}
                 for mm, c, r in target_triples(config) if mm == m]
    return rows


def plot_runs(config):
    """Runs shown in the plots (the target runs), with their methods."""
    return {r: config["runs"][r]["method"] for r in config["targets"].get("runs", [])}


def search_runs(config):
    """Target runs with a scale search (their α goes into the plots)."""
    specs = run_specs(config)
    return [r for r in config["targets"].get("runs", []) if specs[r].searches]


def evaluated_checkpoint(spec):
    """The checkpoint the eval reads: the pseudo one, or the packed one (dequantized on load) when the run
    exports no pseudo checkpoint."""
    return paths.CHECKPOINT if "pseudo" in spec.formats else paths.PACKED


# --- lmms-eval --------------------------------------------------------------------------------------
def lmms_gpus(config):
    """GPUs an lmms-eval job asks the scheduler for: none when the config runs models on the CPU."""
    return 0 if config["device"] == "cpu" else config["lmms_eval"]["gpus"]


def lmms_eval_command(lm, pretrained):
    """The `python -m lmms_eval …` command line of a model folder, as a list, without --output_path
    (eval.lmms_results.run_lmms_eval adds it). An empty first item stands for the job's own interpreter."""
    model_args = f"pretrained={pretrained}" + (f",{lm['model_args']}" if lm["model_args"] else "")
    cmd = [lm["python"], "-m", "lmms_eval", "--model", lm["model"] or LMMS_MODEL, "--model_args", model_args,
           "--tasks", ",".join(lm["tasks"]), "--batch_size", str(lm["batch_size"])]
    if lm["include_path"]:
        cmd += ["--include_path", lm["include_path"]]
    if lm["limit"] is not None:
        cmd += ["--limit", str(lm["limit"])]
    return cmd + list(lm["extra_args"])


# --- scheduler resources ----------------------------------------------------------------------------
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
    if not files and not (Path(path) / "config.json").is_file():
        return 0  # a demo model (check_config has resolved the path); it is a few MB
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
        return BASE_MB + math.ceil(3 * weights_mb * min(config["search"]["layers_per_job"] / model_depth(cfg), 1))
    return BASE_MB + math.ceil(1.5 * weights_mb)


# --- scripts ------------------------------------------------------------------------------------------
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
