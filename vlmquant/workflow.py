"""Glue between Snakemake and the library: config checks, run specs, the files each job reads, search
chunks, targets, the summary's inputs, scheduler resources, and the scripts' logging.

Everything here is a function of the validated config and the files it names (rules/common.smk calls
it); paths come from vlmquant/paths.py. Module-level imports are light (the scripts import
script_logging before anything else); the run specs and their methods are imported where used.
"""
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import yaml
from safetensors import safe_open

from vlmquant import paths
from vlmquant.config_messages import did_you_mean, schema_error
from vlmquant.errors import VlmquantError
from vlmquant.io.fingerprint import check_finite_files, fingerprints, use_cache
from vlmquant.io.model_folder import check_processor_files, safetensors_header
from vlmquant.models import family_names, folder_family, n_layers

FIGURES = ("hidden_error", "alpha", "metrics")
CHECKPOINTS = {"pseudo": paths.CHECKPOINT, "compressed-tensors": paths.PACKED}  # runs.<name>.formats
EVAL_SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")
LMMS_MODEL = "vlmquant"  # lmms-eval's name of vlmquant.eval.lmms_model (every family); `lmms_eval.model` overrides


# --- config ---------------------------------------------------------------------------------------
def check_yaml(path):
    """A YAML syntax error in `path` as one line with its line and column (Snakemake's own message has
    neither). A missing file is left to Snakemake."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise VlmquantError(f"{path}: {where}{problem} (YAML syntax)") from None


def check_choice(key, value, choices):
    """A registry-backed choice (family, method): one line naming the key, as the schema's enums do."""
    if value not in choices:
        raise VlmquantError(f"config: {key}: {value!r} is not one of {sorted(choices)}{did_you_mean(value, choices)}")


def check_config(config, schema_path):
    """Validate against the schema (one-line error naming the key), fill defaults, cross-check names.

    Fills `models.<name>.family` from the folder when absent, and normalises every run to its
    RunSpec's settings (RunSpec.config), so equal runs give equal rule params.
    """
    from snakemake.utils import validate

    from vlmquant.methods import METHODS
    from vlmquant.spec import RunSpec

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = schema_error(config, schema)
    if error is not None:
        raise VlmquantError(error)
    validate(config, str(schema_path), set_default=True)
    for name, cfg in config["models"].items():
        if "family" in cfg:
            check_choice(f"models.{name}.family", cfg["family"], family_names())
        cfg.setdefault("family", folder_family(cfg["path"], f"config: models.{name}.path"))
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
    check_paths(config)
    check_w_groups(config)
    if eval_calib in config["targets"].get("calib", []) and not config["eval"]["allow_overlap"]:
        raise VlmquantError(f"config: eval.calib: {eval_calib!r} is also a search set (targets.calib); evaluate on "
                            "held-out images, or set eval.allow_overlap: true")
    return config


def run_specs(config):
    """{run name: RunSpec} of a checked config (export.ignore in every spec)."""
    from vlmquant.spec import RunSpec

    return {name: RunSpec.from_config(name, run, config["export"]["ignore"]) for name, run in config["runs"].items()}


# --- the paths the config names -------------------------------------------------------------------
def demo_output(path):
    """Whether `path` is one the demo rules build (paths.DEMO_FILES, paths.DEMO_MODEL of a known family; the
    organism's paths.ORGANISM_FILES and paths.ORGANISM_MODEL)."""
    path = os.path.normpath(path)
    built = [*paths.DEMO_FILES.values(), *paths.ORGANISM_FILES.values(), paths.ORGANISM_MODEL]
    if path in {os.path.normpath(p) for p in built}:
        return True
    model = re.fullmatch(re.escape(paths.DEMO_MODEL).replace(r"\{family\}", "(.+)"), Path(path).as_posix())
    return bool(model) and model.group(1) in family_names()


def check_paths(config):
    """Every file and folder the config names exists (the demo rules' outputs excepted): one line naming
    the key and the path. Without this, Snakemake keeps results whose inputs are gone ("Nothing to be
    done") and drops the other edits made with the bad path."""
    def need(key, path, kind):
        if demo_output(path):
            return
        ok = Path(path).is_dir() if kind == "folder" else Path(path).is_file()
        if not ok:
            what = "not found" if not Path(path).exists() else f"is not a {kind}"
            raise VlmquantError(f"config: {key}: {path} {what}")

    for name, cfg in config["models"].items():
        if demo_output(cfg["path"]):
            continue
        need(f"models.{name}.path", cfg["path"], "folder")
        if not (Path(cfg["path"]) / "config.json").is_file():
            raise VlmquantError(f"config: models.{name}.path: {cfg['path']} has no config.json (not a model folder)")
        if not weight_files(cfg["path"]):
            raise VlmquantError(f"config: models.{name}.path: {cfg['path']} has no *.safetensors weights")
        try:  # tokenizer, processor and chat template; every shard as long as its header says
            check_processor_files(cfg["path"])
            for f in weight_files(cfg["path"]):
                if f.endswith(".safetensors"):
                    safetensors_header(f)
        except VlmquantError as e:
            raise VlmquantError(f"config: models.{name}.path: {e}") from None
    for name, cfg in config["calib"].items():
        need(f"calib.{name}.captions", cfg["captions"], "file")
        need(f"calib.{name}.images", cfg["images"], "folder")
        if cfg.get("text"):
            need(f"calib.{name}.text", cfg["text"], "file")
    for name, run in config["runs"].items():
        if run.get("scale_cache"):
            need(f"runs.{name}.scale_cache", run["scale_cache"], "file")


# --- the files a job reads --------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
MODEL_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".py", *WEIGHT_SUFFIXES)  # + weights


def weight_files(folder):
    """The *.safetensors files and their index in a model folder, sorted."""
    return sorted(str(p) for p in Path(folder).glob("*") if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())


def model_files(path, weights=True):
    """Inputs of a job that reads the model at `path`: every file that defines it (config, weights and their
    index, tokenizer, processor, chat template, remote code; `weights=False`: all but the weights), so that
    Snakemake's own triggers see a file changed in place (a folder's time does not change then). A folder the
    demo rules build is its rule's output (Snakemake follows that rule), given as the folder."""
    if demo_output(path):
        return [path]
    files = [p for p in sorted(Path(path).glob("*")) if p.is_file() and not p.name.startswith(".")
             and p.name.endswith(MODEL_SUFFIXES) and p.name not in ("README.md",)]
    return [str(p) for p in files if weights or not p.name.endswith(WEIGHT_SUFFIXES)]


def source_fingerprints(files):
    """{file: content sha256} of those of `files` outside results/ (results/ is the rules' outputs, the demo's
    model and data included: Snakemake follows their rules), cached per file version (io.fingerprint). Rule
    params: a file replaced with its times kept changes them, and Snakemake's params trigger reruns exactly the
    jobs that read it."""
    results = os.path.abspath(paths.RESULTS) + os.sep
    return fingerprints([f for f in files if not os.path.abspath(f).startswith(results)])


def model_fingerprints(path, weights=True):
    """source_fingerprints of model_files(path, weights)."""
    return source_fingerprints(model_files(path, weights))


def calib_fingerprints(cfg, name):
    """source_fingerprints of a calibration set's input files (calib_sources)."""
    files = calib_sources(cfg, name).values()  # images: a list of files, or the demo's folder
    return source_fingerprints([f for v in files for f in (v if isinstance(v, list) else [v])])


def check_models(config):
    """At load, every target model not built by the demo rules: its weights hold only finite values (one line
    naming the file, tensor and count). This reads each shard once per file version (io.fingerprint)."""
    for name in config["targets"].get("models", []):
        path = config["models"][name]["path"]
        if not demo_output(path):
            try:
                check_finite_files([f for f in weight_files(path) if f.endswith(".safetensors")])
            except VlmquantError as e:
                raise VlmquantError(f"config: models.{name}.path: {e}") from None


def calib_images(cfg, name):
    """The image files calibration set `name` uses (its rows' images, drawn as the calib stage draws them).

    Drawing them reads the whole source (seconds for COCO train), so the list is kept in paths.CALIB_FILES
    under a key of the set's settings and the content fingerprints of its source files, and read from there
    while these are unchanged. Raises VlmquantError naming the key and the first missing file.
    """
    from vlmquant.io.atomic import atomic_path

    stamp = fingerprints([cfg[k] for k in ("captions", "text") if cfg.get(k)])  # content, even with old times
    key = hashlib.sha256(json.dumps([cfg, list(stamp.values())], sort_keys=True).encode()).hexdigest()
    cache = Path(paths.CALIB_FILES.format(calib=name))
    try:
        kept = json.loads(cache.read_text())
        files = kept["files"] if kept["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if files is None:
        from vlmquant.data.calib import sample_rows

        used = sorted({f for row in sample_rows(cfg, name) for f in row.file_names})
        files = [str(Path(cfg["images"]) / f) for f in used]
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({"key": key, "files": files}))
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise VlmquantError(f"config: calib.{name}.images: {missing[0]} not found "
                            f"({len(missing)} of the {len(files)} images the set uses are missing)")
    return files


def calib_sources(cfg, name="calib"):
    """The input files of a calibration set: the captions file, the image files its rows use (so a changed
    or replaced image reruns it, and a different image folder too), and the text corpus for interleave.
    Sets on the demo's data take the demo rule's outputs (the captions file and the image folder)."""
    files = {"captions": cfg["captions"]}
    if on_demo_data(cfg):
        files["images"] = cfg["images"]
    else:
        files["images"] = calib_images(cfg, name)
    if cfg["format"] == "interleave":
        files["text"] = cfg["text"]
    return files


# --- eval set vs search sets ------------------------------------------------------------------------
def check_disjoint(eval_name, eval_images, search_name, search_images, allow=False):
    """Refuse an eval set that shares images (by content: {sha256: file}) with a search set, naming both
    sets and one shared image; `allow` (eval.allow_overlap) turns the error into a warning."""
    shared = sorted(set(eval_images) & set(search_images))
    if not shared:
        return
    first = shared[0]
    message = (f"config: eval.calib: {eval_name!r} shares {len(shared)} of its {len(set(eval_images))} images with "
               f"search set {search_name!r} (same content: {eval_images[first]} and {search_images[first]}); "
               "evaluate on held-out images, or set eval.allow_overlap: true")
    if not allow:
        raise VlmquantError(message)
    logging.getLogger(__name__).warning("%s (allowed by eval.allow_overlap)", message)


def source_hashes(cfg, name):
    """{sha256: file} of the images calibration set `name` uses, from its source files."""
    return {sha: f for f, sha in fingerprints(calib_images(cfg, name)).items()}


def on_demo_data(cfg):
    """A calibration set reading the demo's or the organism's data (paths.DEMO_FILES, paths.ORGANISM_FILES),
    which rule demo_data or organism_data builds."""
    return any(demo_output(cfg[k]) for k in ("captions", "images"))


def check_calib_sets(config):
    """At load, for every calibration set in use (targets.calib, eval.calib) not on the demo's data: its
    source is read and every image its rows use exists (what calib_sources lists), and eval.calib shares
    no image with a target set (by content). Snakemake ignores errors raised inside input functions when
    the output exists already, so anything an input function could raise is raised here first.
    Sets on demo data are checked by the eval job on the calibration Parquets (check_eval_parquets)."""
    e = config["eval"]["calib"]
    used = dict.fromkeys([*config["targets"].get("calib", []), e])
    for name in used:
        if not on_demo_data(config["calib"][name]):
            calib_images(config["calib"][name], name)
    if on_demo_data(config["calib"][e]):
        return
    for c in config["targets"].get("calib", []):
        if c != e and not on_demo_data(config["calib"][c]):
            check_disjoint(e, source_hashes(config["calib"][e], e), c, source_hashes(config["calib"][c], c),
                           config["eval"]["allow_overlap"])


def check_eval_parquets(eval_calib, eval_path, calib, calib_path, allow=False):
    """check_disjoint on two calibration Parquets (their image_sha256 and file_names columns)."""
    import pyarrow.parquet as pq

    def hashes(path):
        t = pq.read_table(path, columns=["image_sha256", "file_names"]).to_pylist()
        return {h: f for row in t for h, f in zip(row["image_sha256"], row["file_names"])}

    if eval_calib != calib:
        check_disjoint(eval_calib, hashes(eval_path), calib, hashes(calib_path), allow)


# --- w_group ------------------------------------------------------------------------------------------
GROUP_MULTIPLE = 16  # w_group: -1, or a positive multiple of this


def quantized_widths(model_cfg):
    """{input width: config key} of the language decoder's linears, from config.json (the text config):
    hidden_size (q, k, v, gate, up), heads × head_dim (o), intermediate_size (down), and the MoE and
    linear-attention widths where the config has them. A demo model not built yet: the demo's sizes."""
    path = Path(model_cfg["path"])
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config") or cfg.get("llm_config") or cfg
    else:
        from vlmquant.demo.sizes import TEXT_SIZES  # demo paths only (check_paths has checked the others)

        cfg = TEXT_SIZES
    widths = {}
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    keys = {"hidden_size": hidden, "num_attention_heads × head_dim": heads * head_dim if heads and head_dim else None,
            "intermediate_size": cfg.get("intermediate_size"), "moe_intermediate_size": cfg.get("moe_intermediate_size"),
            "shared_expert_intermediate_size": cfg.get("shared_expert_intermediate_size")}
    if cfg.get("linear_num_value_heads") and cfg.get("linear_value_head_dim"):
        keys["linear_num_value_heads × linear_value_head_dim"] = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    for key, width in keys.items():
        if isinstance(width, int) and width > 0:
            widths.setdefault(width, key)
    return widths


def check_w_groups(config):
    """Every weight-only run's w_group is -1 or a positive multiple of GROUP_MULTIPLE, and divides every
    quantized input width of every target model (quantized_widths), so a bad group fails at load, not
    inside a search or export job. One line naming the run, the key and the width."""
    from vlmquant.spec import RunSpec

    targets = set(config["targets"].get("runs", []))
    for name, run in config["runs"].items():
        spec = RunSpec.from_config(name, run)
        if spec.weight_activation:
            continue
        g = spec.w_group
        if g != -1 and (g <= 0 or g % GROUP_MULTIPLE):
            raise VlmquantError(f"config: runs.{name}.w_group: {g} is not supported; use -1 (one group per output "
                                f"row) or a positive multiple of {GROUP_MULTIPLE} (32, 64 and 128 are served by vLLM)")
        if g == -1 or name not in targets:
            continue
        for m in config["targets"].get("models", []):
            widths = quantized_widths(config["models"][m])
            for width, key in widths.items():
                if width % g:
                    fits = [d for d in (16, 32, 64, 128, 256) if all(w % d == 0 for w in widths)]
                    raise VlmquantError(f"config: runs.{name}.w_group: {g} does not divide {key} = {width} of model "
                                        f"{m!r}; use -1" + (f" or one of {fits}" if fits else ""))


def name_pattern(names):
    """Wildcard constraint matching exactly the given names."""
    return "|".join(map(re.escape, names)) or "NONE"


def calib_params(cfg):
    """The calibration settings that affect the Parquet (the text corpus only for interleave; `labels`
    acts on the model inputs)."""
    unused = ("labels",) if cfg["format"] == "interleave" else ("labels", "text", "interleave_tokens")
    return {k: v for k, v in cfg.items() if k not in unused}


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
    from vlmquant.demo.sizes import TEXT_SIZES  # demo paths only (folder_family has checked the path)

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
    """Input of a search job with the inputs of its first layer: the fp acts folder, or for a chained (distort,
    GPTQ on quantized inputs) run's later chunks the previous chunk's folder (its next_inputs)."""
    first = chunk_layers(config, wildcards.model, wildcards.chunk)[0]
    if spec.chained and first > 0:
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
    """What `rule all` builds: every output of the target runs' stages (calibration sets, inputs, grads, acts,
    search chunks, scale cache, checkpoints of its formats, eval and fp tables), the summary table, all_runs.csv,
    the plots, and the lmms-eval results when enabled.

    Intermediate outputs are targets too: Snakemake rebuilds a missing file only when a job that must run needs
    it, so a search chunk folder that Snakemake removed after an interrupted `--forcerun search` (an incomplete
    output) would otherwise stay missing while the old scale cache and checkpoints were kept. As targets, a
    missing one is rebuilt and everything after it reruns (its outputs are newer)."""
    specs = run_specs(config)
    out = [paths.SUMMARY_CSV, paths.SUMMARY_PARQUET, paths.SUMMARY_HTML, paths.ALL_RUNS]
    eval_calib = config["eval"]["calib"]
    for m in config["targets"].get("models", []):
        fp = dict(model=m, eval_calib=eval_calib)
        out += [paths.CALIB.format(calib=eval_calib), paths.INPUTS.format(model=m, calib=eval_calib),
                paths.FP_REF.format(**fp), paths.FP_TABLE.format(**fp)]
    for m, c, r in target_triples(config):
        ids = dict(model=m, calib=c, run=r)
        out += [paths.CALIB.format(calib=c), paths.INPUTS.format(**ids), paths.EVAL.format(**ids)]
        if specs[r].searches:
            out += [paths.ACTS.format(**ids), paths.SEARCH_TABLE.format(**ids)]
            out += [paths.SCALES.format(**ids, chunk=paths.chunk_id(a)) for a, _ in chunks(config, m)]
            out += [paths.GRADS.format(**ids)] if specs[r].needs_grads else []
        out += [paths.SCALE_CACHE.format(**ids)] if specs[r].has_cache else []
        out += [template.format(**ids) for fmt, template in CHECKPOINTS.items() if fmt in specs[r].formats]
        if config["lmms_eval"]["enabled"]:
            out.append(paths.LMMS.format(**ids))
    t = config["targets"]
    out += [paths.PLOT.format(model=m, calib=c, figure=f) for m in t.get("models", []) for c in t.get("calib", [])
            for f in FIGURES]
    if config["lmms_eval"]["enabled"] and config["lmms_eval"]["include_fp"]:
        out += [paths.LMMS_FP.format(model=m) for m in t.get("models", [])]
    return list(dict.fromkeys(out))


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
    return [r for r in config["targets"].get("runs", []) if specs[r].searches and specs[r].has_scales]


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
    if not files and demo_output(path):
        return 0  # a demo model not built yet; it is a few MB
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
STATUS_EVERY = 30.0  # seconds between two status lines of one running progress bar
STATUS_MIN = 2  # seconds a progress bar must have run to be shown on the terminal
PROGRESS = re.compile(r"\d+/\d+ \[(?:(\d+):)?(\d+):(\d+)")  # tqdm: "n/total [elapsed<remaining, rate]"
BAR = re.compile(r"\s*\d+%\|[^|]*\|\s*")


def job_label(snakemake):
    """`rule wildcard values` of a Snakemake job (e.g. "search demo-qwen2vl/demo/mbq-w3g128/000")."""
    wildcards = "/".join(str(v) for v in snakemake.wildcards) if snakemake.wildcards else ""
    return f"{snakemake.rule} {wildcards}".strip()


class StatusStream:
    """A job's stderr: everything goes to the log; the final state of the job's own progress bar (the one named
    after its rule, e.g. `search`) and of every other bar that ran STATUS_MIN s or more (and of a running one
    every STATUS_EVERY s) also goes to Snakemake's terminal as one line `[job] desc: n/total [elapsed<remaining,
    rate]`."""

    def __init__(self, log, terminal, label):
        self.log, self.terminal, self.label = log, terminal, label
        self.own = label.split(" ")[0] + ":"
        self.line, self.last = "", time.monotonic()

    def write(self, text):
        self.log.write(text)
        for part in re.split(r"(\r|\n)", text):
            if part == "\n":
                self._status(final=True)
                self.line = ""
            elif part == "\r":
                self._status(final=False)
                self.line = ""
            else:
                self.line += part
        return len(text)

    def _status(self, final):
        now = time.monotonic()
        bar = PROGRESS.search(self.line)
        if not bar:
            return
        h, m, sec = (int(x or 0) for x in bar.groups())
        own = final and self.line.lstrip().startswith(self.own)
        if own or (3600 * h + 60 * m + sec >= STATUS_MIN and (final or now - self.last >= STATUS_EVERY)):
            self.terminal.write(f"[{self.label}] {BAR.sub(' ', self.line).strip()}\n")
            self.terminal.flush()
            self.last = now

    def flush(self):
        self.log.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.log.fileno()

    @property
    def encoding(self):
        return self.log.encoding


@contextlib.contextmanager
def script_logging(snakemake):
    """Run a job's body with logging and stderr (tqdm) in the rule's log, status lines on Snakemake's terminal.

    Any error's traceback goes into the log; one line also goes to the terminal: a VlmquantError's own
    line, or `Type: message (traceback in <log>)` for any other exception. The job then exits with 1.
    """
    use_cache(paths.FINGERPRINTS)  # the fingerprints the workflow computed at load
    log_path = snakemake.log[0] if snakemake.log else None
    terminal = sys.stderr
    label = job_label(snakemake)
    log = open(log_path, "w") if log_path else terminal
    stream = StatusStream(log, terminal, label) if log_path else terminal
    file_handler = logging.StreamHandler(stream)
    file_handler.setLevel(logging.INFO)
    handlers = [file_handler]
    if log_path:  # warnings also where the user looks
        terminal_handler = logging.StreamHandler(terminal)
        terminal_handler.setLevel(logging.WARNING)
        terminal_handler.setFormatter(logging.Formatter(f"[{label}] %(levelname)s: %(message)s"))
        handlers.append(terminal_handler)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    sys.stderr = stream
    try:
        yield
    except VlmquantError as e:
        print(f"error: {e}", file=log)
        if log_path:
            print(f"[{label}] error: {e}", file=terminal)
        sys.exit(1)
    except Exception as e:
        traceback.print_exc(file=log)
        if log_path:
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"[{label}] error: {type(e).__name__}: {first} (traceback in {log_path})", file=terminal)
        sys.exit(1)
    finally:
        sys.stderr = terminal
        logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(terminal)], force=True)
        if log_path:
            log.close()
