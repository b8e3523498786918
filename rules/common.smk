# Config validation, wildcard constraints and the input/param functions of the rules. The logic lives
# in the vlmquant/workflow/ package, the paths in vlmquant/paths.py.
import os

from vlmquant import paths
from vlmquant import workflow as W
from vlmquant.io.fingerprint import use_cache

# content hashes of the files read from outside results/, once per file version
use_cache(paths.FINGERPRINTS)
with W.config_errors(CONFIG_FILES, CONFIG_ARGS):
    config = W.check_config(
        config, os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")
    )
    # reads the calibration sources and the weights (once per file version): once, not in every cluster job
    if workflow.is_main_process:
        W.check_calib_sets(config)
        W.check_models(config)
        W.print_notes(config)
    RUNS = W.run_specs(config)


wildcard_constraints:
    model=W.name_pattern(config["models"]),
    calib=W.name_pattern(config["calib"]),
    eval_calib=W.name_pattern(config["calib"]),
    run=W.name_pattern(config["runs"]),
    chunk=r"\d{3}",
    family=r"[a-z0-9_]+",
    figure=W.name_pattern(W.FIGURES),


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def model_dir(wildcards):
    return config["models"][wildcards.model]["path"]


def model_files(wildcards):
    return W.model_files(model_dir(wildcards))


def processor_files(wildcards):
    return W.model_files(model_dir(wildcards), weights=False)


def calib_sources(wildcards):
    return W.calib_sources(config["calib"][wildcards.calib], wildcards.calib)


# params `sources`: content fingerprints of the files a job reads from outside results/, so a file replaced
# with its timestamps kept reruns exactly the jobs that read it (Snakemake's params trigger)
def model_sources(wildcards):
    return W.model_fingerprints(model_dir(wildcards))


def processor_sources(wildcards):
    return W.model_fingerprints(model_dir(wildcards), weights=False)


def calib_source_sums(wildcards):
    return W.calib_fingerprints(config["calib"][wildcards.calib], wildcards.calib)


def calib_cfg(wildcards):
    return W.calib_params(config["calib"][wildcards.calib])


def calib_labels(wildcards):
    return config["calib"][wildcards.calib]["labels"]


def names(wildcards):
    return {"model": wildcards.model, "calib": wildcards.calib, "run": wildcards.run}


def grads_input(wildcards):
    return W.fill(paths.GRADS, wildcards) if RUNS[wildcards.run].needs_grads else []


def chunk_starts(wildcards):
    return [a for a, _ in W.chunks(config, wildcards.model)]


def chunk_layers(wildcards):
    return W.chunk_layers(config, wildcards.model, wildcards.chunk)


def search_start(wildcards):
    return W.search_start(config, RUNS[wildcards.run], wildcards)


def search_params(wildcards):
    return RUNS[wildcards.run].search_params()


def chunk_folders(wildcards):
    return W.chunk_folders(config, wildcards)


def scale_meta(wildcards):
    return {**names(wildcards), "run_config": search_params(wildcards)}


def export_inputs(wildcards):
    files = {"model": model_files(wildcards)}
    if RUNS[wildcards.run].has_cache:
        files["cache"] = W.fill(paths.SCALE_CACHE, wildcards)
    return files


def imported_cache(wildcards):
    return RUNS[wildcards.run].scale_cache


def import_sources(wildcards):
    return {
        **model_sources(wildcards),
        **W.source_fingerprints([imported_cache(wildcards)]),
    }


def export_params(wildcards):
    return RUNS[wildcards.run].export_params()


def eval_ids(wildcards):
    return {**names(wildcards), "eval_calib": config["eval"]["calib"]}


def eval_inputs(wildcards):
    ids = eval_ids(wildcards)
    files = {
        "inputs": paths.INPUTS.format(model=ids["model"], calib=ids["eval_calib"]),
        "ref": paths.FP_REF.format(**ids),
        "model": model_files(wildcards),
    }
    # the run's weights are made in memory from the model and the scale cache (no checkpoint read); the eval set
    # must not overlap the set the scales came from
    if RUNS[wildcards.run].has_cache:
        files["cache"] = W.fill(paths.SCALE_CACHE, wildcards)
        files["eval_set"] = paths.CALIB.format(calib=ids["eval_calib"])
        files["search_set"] = paths.CALIB.format(calib=ids["calib"])
    return files


def summary_inputs(wildcards):
    rows = W.summary_rows(config)
    # every checkpoint of the targets: the summary reads the benchmark file of each (neither is upstream of eval)
    checkpoints = [
        template.format(model=m, calib=c, run=r)
        for m, c, r in W.target_triples(config)
        for fmt, template in W.CHECKPOINTS.items()
        if fmt in RUNS[r].formats
    ]
    return {
        "tables": [row["path"] for row in rows],
        "lmms": [row["lmms"] for row in rows if row["lmms"]],
        "checkpoints": checkpoints,
    }


def plot_inputs(wildcards):
    return {
        "summary": paths.SUMMARY_PARQUET,
        "evals": [W.fill(paths.EVAL, wildcards, run=r) for r in W.plot_runs(config)],
        "searches": [
            W.fill(paths.SEARCH_TABLE, wildcards, run=r) for r in W.search_runs(config)
        ],
    }


def lmms_task_input():
    path = config["lmms_eval"]["include_path"]
    return {"tasks": path} if path else {}


def lmms_inputs(wildcards):
    folder = W.fill(W.evaluated_checkpoint(RUNS[wildcards.run]), wildcards)
    return {"model": folder, **lmms_task_input()}


def lmms_fp_inputs(wildcards):
    return {"model": model_dir(wildcards), **lmms_task_input()}


def lmms_command(wildcards):
    # from the wildcards, not `input`: params that read `input` are not recorded for the params rerun trigger
    inputs = lmms_inputs if "run" in wildcards.keys() else lmms_fp_inputs
    folder = inputs(wildcards)["model"]
    return W.lmms_eval_command(config["lmms_eval"], folder)


def host_mem(stage):
    """Resource function: host memory (MB) of a `stage` job of the {model} wildcard's model."""

    def resource(wildcards):
        return W.job_mem_mb(config, wildcards.model, stage)

    return resource
