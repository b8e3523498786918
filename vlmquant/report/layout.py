"""Workflow glue of the export → eval → summary stages: output paths, per-rule params, targets.

Imported by rules/common.smk; everything here is a pure function of the validated config.
"""
import shlex

from vlmquant.errors import VlmquantError
from vlmquant.workflow import search_chunks

FIGURES = ("hidden_error", "alpha", "metrics")
EVAL_SETTINGS = ("batch_size", "kl_top_k", "hidden_positions")
EXPORT_RUN_KEYS = ("method", "w_bit", "w_group", "a_bit")
# lmms-eval's model names of our families (`lmms_eval.model` overrides)
LMMS_MODELS = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}


def check_eval_config(config):
    """Cross-checks of the eval, export and lmms_eval keys that the schema cannot express."""
    name = config["eval"]["calib"]
    if name not in config["calib"]:
        raise VlmquantError(f"config: eval.calib: {name!r} is not defined under 'calib' "
                            "(name a held-out calibration set, disjoint from the search sets)")
    lm = config["lmms_eval"]
    if lm["enabled"]:
        for m in config["targets"].get("models", []):
            family = config["models"][m]["family"]
            if not lm["model"] and family not in LMMS_MODELS:
                raise VlmquantError(f"config: lmms_eval.model: no default lmms-eval model for family {family!r}; set it")
    return config


def is_rtn(run_cfg):
    return run_cfg["method"] == "rtn"


def target_triples(config):
    t = config["targets"]
    return [(m, c, r) for m in t.get("models", []) for c in t.get("calib", []) for r in t.get("runs", [])]


# --- paths -----------------------------------------------------------------------------------
def checkpoint_dir(model, calib, run):
    return f"results/{model}/{calib}/{run}/checkpoint"


def eval_table(model, calib, run):
    return f"results/{model}/{calib}/{run}/eval.parquet"


def fp_ref(model, eval_calib):
    return f"results/{model}/eval-{eval_calib}/fp.safetensors"


def fp_table(model, eval_calib):
    return f"results/{model}/eval-{eval_calib}/fp.parquet"


def plot_file(model, calib, figure):
    return f"results/plots/{model}/{calib}/{figure}.png"


def lmms_dir(model, calib=None, run=None):
    return f"results/{model}/fp/lmms_eval" if run is None else f"results/{model}/{calib}/{run}/lmms_eval"


# --- params ----------------------------------------------------------------------------------
def export_run(run_cfg):
    """The run settings the checkpoint depends on (not the search-only ones: loss, n_grid, reweight)."""
    return {k: run_cfg[k] for k in EXPORT_RUN_KEYS if k in run_cfg}


def eval_settings(config):
    return {k: config["eval"][k] for k in EVAL_SETTINGS}


def benchmarks(config, model, calib, run):
    """{stage: [benchmark tsv]} of the stages that produced one run's eval table."""
    run_cfg = config["runs"][run]
    base = f"results/benchmarks/{model}/{calib}"
    out = {"export": [f"{base}/{run}/export.tsv"], "eval": [f"{base}/{run}/eval.tsv"]}
    if not is_rtn(run_cfg):
        out["acts"] = [f"{base}/acts.tsv"]
        out["search"] = [f"{base}/{run}/search_{a:03d}.tsv" for m, a, _ in search_chunks(config) if m == model]
        if run_cfg.get("reweight"):
            out["grads"] = [f"{base}/grads.tsv"]
    return out


def summary_rows(config):
    """Every table of the summary: [{model, calib, run, path, bench}] — fp rows first, per model."""
    eval_calib = config["eval"]["calib"]
    rows = []
    for m in config["targets"].get("models", []):
        rows.append({"model": m, "calib": None, "run": "fp", "path": fp_table(m, eval_calib),
                     "bench": {"eval": [f"results/benchmarks/{m}/eval-{eval_calib}/fp.tsv"]}})
        rows += [{"model": m, "calib": c, "run": r, "path": eval_table(m, c, r), "bench": benchmarks(config, m, c, r)}
                 for mm, c, r in target_triples(config) if mm == m]
    return rows


def plot_runs(config):
    """Runs shown in the plots (the target runs), with their methods."""
    return {r: config["runs"][r]["method"] for r in config["targets"].get("runs", [])}


def search_runs(config):
    return [r for r in config["targets"].get("runs", []) if not is_rtn(config["runs"][r])]


# --- lmms-eval -------------------------------------------------------------------------------
def lmms_eval_command(lm, family, pretrained, output_path):
    """The `python -m lmms_eval …` command line (a string for a shell rule)."""
    model = lm["model"] or LMMS_MODELS.get(family)
    if not model:
        raise VlmquantError(f"config: lmms_eval.model: no default lmms-eval model for family {family!r}; set it")
    model_args = f"pretrained={pretrained}" + (f",{lm['model_args']}" if lm["model_args"] else "")
    cmd = [lm["python"], "-m", "lmms_eval", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(lm["tasks"]), "--batch_size", str(lm["batch_size"]), "--output_path", str(output_path)]
    if lm["limit"] is not None:
        cmd += ["--limit", str(lm["limit"])]
    return shlex.join(cmd + list(lm["extra_args"]))


# --- targets ---------------------------------------------------------------------------------
def final_targets(config):
    """`rule all`: the summary table, the plots, and the lmms-eval results when enabled."""
    t = config["targets"]
    out = ["results/summary.csv", "results/summary.parquet"]
    out += [plot_file(m, c, f) for m in t.get("models", []) for c in t.get("calib", []) for f in FIGURES]
    if config["lmms_eval"]["enabled"]:
        out += [lmms_dir(m, c, r) for m, c, r in target_triples(config)]
        if config["lmms_eval"]["include_fp"]:
            out += [lmms_dir(m) for m in t.get("models", [])]
    return out
