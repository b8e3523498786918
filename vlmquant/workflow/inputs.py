"""Targets and DAG inputs: the run specs, the files each job reads (and their content fingerprints), search
chunks, `rule all`'s targets and the summary's inputs, as functions of the checked config and the files it names.
Paths come from vlmquant/paths.py; rules/common.smk calls these through `vlmquant.workflow`."""
import glob
import hashlib
import json
import os
import re
from pathlib import Path

from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.io.fingerprint import fingerprints, sha256_file
from vlmquant.models import family_names, n_layers

FIGURES = ("hidden_error", "alpha", "metrics")
CHECKPOINTS = {"pseudo": paths.CHECKPOINT, "compressed-tensors": paths.PACKED}  # runs.<name>.formats
EVAL_SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")
LMMS_MODEL = "vlmquant"  # lmms-eval's name of vlmquant.eval.lmms_model (every family); `lmms_eval.model` overrides


def run_specs(config):
    """{run name: RunSpec} of a checked config (export.ignore and export.formats in every spec)."""
    from vlmquant.spec import RunSpec

    export = config["export"]
    return {name: RunSpec.from_config(name, run, export["ignore"], export["formats"])
            for name, run in config["runs"].items()}


def demo_output(path):
    """Whether `path` is one the demo rules build (paths.DEMO_FILES, paths.DEMO_MODEL of a known family; the
    organism's paths.ORGANISM_FILES and paths.ORGANISM_MODEL)."""
    path = os.path.normpath(path)
    built = [*paths.DEMO_FILES.values(), *paths.ORGANISM_FILES.values(), paths.ORGANISM_MODEL]
    if path in {os.path.normpath(p) for p in built}:
        return True
    model = re.fullmatch(re.escape(paths.DEMO_MODEL).replace(r"\{family\}", "(.+)"), Path(path).as_posix())
    return bool(model) and model.group(1) in family_names()


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


def on_demo_data(cfg):
    """A calibration set reading the demo's or the organism's data (paths.DEMO_FILES, paths.ORGANISM_FILES),
    which rule demo_data or organism_data builds."""
    return any(demo_output(cfg[k]) for k in ("captions", "images"))


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
    search chunks, scale cache, checkpoints of its formats, eval and fp tables), the summary table, accuracy.json,
    all_runs.csv, the plots, and the lmms-eval results when enabled.

    Intermediate outputs are targets too: Snakemake rebuilds a missing file only when a job that must run needs
    it, so a search chunk folder that Snakemake removed after an interrupted `--forcerun search` (an incomplete
    output) would otherwise stay missing while the old scale cache and checkpoints were kept. As targets, a
    missing one is rebuilt and everything after it reruns (its outputs are newer)."""
    specs = run_specs(config)
    out = [paths.SUMMARY_CSV, paths.SUMMARY_PARQUET, paths.SUMMARY_HTML, paths.ACCURACY, paths.ALL_RUNS]
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
    """Every table of the summary: [{model, calib, run, path, bench, lmms, calib_format}], the fp row of each model
    first. lmms: the lmms-eval results folder of the row when lmms_eval is enabled (for fp: with include_fp), else
    None; calib_format: the calibration set's `format` (None for fp)."""
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
                  "lmms": paths.LMMS.format(model=m, calib=c, run=r) if lm["enabled"] else None,
                  "calib_format": config["calib"][c]["format"]}
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
    """The checkpoint lmms-eval reads: the pseudo one, or the packed one (dequantized on load) when the run
    exports no pseudo checkpoint. (The eval table needs none: eval.run.RunWeights.)"""
    return paths.CHECKPOINT if "pseudo" in spec.formats else paths.PACKED


# --- lmms-eval --------------------------------------------------------------------------------------
def lmms_eval_command(lm, pretrained):
    """The `python -m lmms_eval …` command line of a model folder, as a list, without --output_path
    (eval.lmms_results.run_lmms_eval adds it). An empty first item stands for the job's own interpreter.
    --log_samples: the per-question scores the summary's standard errors and paired tests read."""
    model_args = f"pretrained={pretrained}" + (f",{lm['model_args']}" if lm["model_args"] else "")
    cmd = [lm["python"], "-m", "lmms_eval", "--model", lm["model"] or LMMS_MODEL, "--model_args", model_args,
           "--tasks", ",".join(lm["tasks"]), "--batch_size", str(lm["batch_size"])]
    if lm["include_path"]:
        cmd += ["--include_path", lm["include_path"]]
    if lm["limit"] is not None:
        cmd += ["--limit", str(lm["limit"])]
    return cmd + ["--log_samples", *lm["extra_args"]]


def present_tables():
    """Paths (relative to the working directory, sorted) of every eval table (paths.EVAL) and fp table
    (paths.FP_TABLE) on disk."""
    found, wildcards = set(), ("model", "calib", "run", "eval_calib")
    for template in (paths.EVAL, paths.FP_TABLE):
        found.update(glob.glob(template.format(**{w: "*" for w in wildcards if "{" + w + "}" in template})))
    return sorted(found)


def other_tables(target_paths):
    """{path: sha256} of the tables present that are not in `target_paths` (the summary's own tables): the summary
    job's params, so it reruns when one appears, changes or goes (report.all_runs)."""
    targets = set(target_paths)
    return {p: sha256_file(p) for p in present_tables() if p not in targets}
