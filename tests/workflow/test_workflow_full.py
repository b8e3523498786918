"""End to end through export → eval → summary → plots → report on the demo, and what reruns when."""
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import snakemake_env
from e2e_pipeline import CALIB, EVAL_CALIB, MODEL, RUNS
from vlmquant import paths
from vlmquant.report.summary import COLUMNS
from vlmquant.workflow import FIGURES

pytestmark = pytest.mark.slow
DOWNSTREAM_OF_EVAL = {"summary": 1, "plots": 1, "all": 1}


@pytest.fixture(scope="module")
def summary(pipe):
    return pd.read_csv(pipe / paths.SUMMARY_CSV)


def row(summary, run):
    (i,) = np.flatnonzero(summary.run == run)
    return summary.iloc[i]


def test_summary_rows_and_columns(pipe, summary):
    assert list(summary.columns) == COLUMNS
    assert list(summary.run) == ["fp", *RUNS] and set(summary.model) == {MODEL}
    assert summary.calib.isna().tolist() == [True, False, False, False] and set(summary.calib.dropna()) == {CALIB}
    assert list(summary.method) == ["fp", "rtn", "awq", "mbq"]
    assert summary.w_bit.tolist() == [32, 3, 3, 3] and summary.w_group.isna().tolist() == [True, False, False, False]
    assert set(summary.eval_calib) == {EVAL_CALIB} and (summary.n_samples == 6).all()
    assert summary.n_caption_tokens.nunique() == 1
    fp = row(summary, "fp")
    assert fp.kl == 0 and fp.hidden_err_vision == 0 and fp.top1_agreement == 1
    for run in RUNS:
        r = row(summary, run)
        assert r.kl > 0 and r.hidden_err_vision > 0 and r.hidden_err_text > 0 and r.weight_err > 0
        assert r.caption_ppl == pytest.approx(math.exp(r.caption_nll), rel=1e-5)
        assert r.hidden_err_vision_last >= r.hidden_err_vision  # errors grow through the (random) layers here
    parquet = pd.read_parquet(pipe / paths.SUMMARY_PARQUET)
    assert list(parquet.columns) == COLUMNS and parquet.run.tolist() == summary.run.tolist()
    assert np.allclose(parquet.caption_nll, summary.caption_nll, rtol=1e-5)


def test_summary_stage_times(summary):
    times = summary.set_index("run")[[c for c in COLUMNS if c.startswith("time_")]]
    assert times.loc["fp"].time_eval_s > 0 and times.loc["fp"].drop(["time_eval_s", "time_total_s"]).isna().all()
    for run in RUNS:
        t = times.loc[run]
        assert t.time_export_s > 0 and t.time_pack_s > 0 and t.time_eval_s > 0
        assert math.isnan(t.time_grads_s) == (run != "mbq-w3g128")  # only MBQ reweights
        assert math.isnan(t.time_search_s) == math.isnan(t.time_acts_s) == (run == "rtn-w3g128")
        assert t.time_total_s == pytest.approx(t.drop("time_total_s").sum(skipna=True))


def test_model_jobs_ran_in_the_job_server(pipe):
    """Every job with a benchmark file ran in a fork of the run's job server: its own process, which Snakemake
    measures, never imported torch (about 27 MB peak, against about 470 MB for a job that runs itself)."""
    rows = [pd.read_csv(path, sep="\t") for path in (pipe / "results" / "benchmarks").rglob("*.tsv")]
    assert len(rows) >= 10
    assert max(float(row["max_rss"].iloc[0]) for row in rows) < 100


def test_demo_figures_scale_search_beats_rtn(summary):
    """On the demo, AWQ and MBQ have held-out caption NLL and KL no worse than RTN (reported figures)."""
    figures = summary.set_index("run")[["caption_nll", "kl", "hidden_err_vision", "hidden_err_text"]]
    print("\n" + figures.to_string())
    for run in ("awq-w3g128", "mbq-w3g128"):
        assert figures.loc[run].caption_nll <= figures.loc["rtn-w3g128"].caption_nll
        assert figures.loc[run].kl <= figures.loc["rtn-w3g128"].kl


def test_plots_are_drawn(pipe):
    for figure in FIGURES:
        path = pipe / paths.PLOT.format(model=MODEL, calib=CALIB, figure=figure)
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 800 and img.height >= 400
            pixels = np.asarray(img.convert("L"), dtype=float)
        assert (pixels < 200).mean() > 0.01, figure  # lines, bars and text, not a blank canvas


def test_nothing_changed_runs_nothing(pipe):
    assert pipe.planned() == {}


@pytest.mark.parametrize("key, value", [("hidden_positions", 8), ("kl_top_k", 100), ("batch_size", 2)])
def test_eval_setting_reruns_only_eval_and_summary(pipe, key, value):
    with pipe.edited_config(lambda c: c["eval"].update({key: value})):
        assert pipe.planned() == {"eval_fp": 1, "eval": 3, **DOWNSTREAM_OF_EVAL}
    assert pipe.planned() == {}


def test_export_settings_rerun_export_onwards(pipe):
    """The shard size is no setting of the weights: the eval (in memory, reading no checkpoint) keeps its table."""
    with pipe.edited_config(lambda c: c["export"].update(max_shard_size="4MB")):
        assert pipe.planned() == {"export": 3, "pack": 3, **DOWNSTREAM_OF_EVAL}
    with pipe.edited_config(lambda c: c["export"].update(ignore=["mlp.down_proj"])):
        assert pipe.planned() == {"export": 3, "pack": 3, "eval": 3, **DOWNSTREAM_OF_EVAL}


def test_search_setting_reruns_that_run_only(pipe):
    with pipe.edited_config(lambda c: c["runs"]["mbq-w3g128"].update(n_grid=10)):
        jobs = pipe.planned()
    assert jobs == {"search": 2, "merge": 1, "export": 1, "pack": 1, "eval": 1, **DOWNSTREAM_OF_EVAL}


def test_rtn_never_needs_grads_acts_or_search(pipe):
    with pipe.edited_config(lambda c: c["targets"].update(runs=["rtn-w3g128"])):
        jobs = pipe.planned("--forceall")
    assert jobs["export"] == 1 and jobs["eval"] == 1 and jobs["eval_fp"] == 1
    assert not {"grads", "acts", "search", "merge"} & set(jobs)


def test_report_builds(pipe):
    out = pipe / "results/report.html"
    pipe.snakemake("--report", "results/report.html")
    html = out.read_text()
    for name in ("summary.csv", "summary.html", *[f"{f}.png" for f in FIGURES]):
        assert f'"name": "{name}"' in html, name
    assert '"category"' in html or "Summary" in html
    assert "held-out calibration set" in html and "demo-holdout" in html  # captions rendered with the config


def test_lmms_eval_is_optional(pipe):
    assert not any("lmms_eval" in str(p) for p in (pipe / "results").rglob("*"))
    with pipe.edited_config(lambda c: c["lmms_eval"].update(enabled=True, tasks=["mme", "mmmu_val"], limit=8)):
        planned = pipe.planned()
    # the lmms-eval jobs and what reads their scores (test_organism_workflow.py runs them)
    assert planned == {"lmms_eval": 3, "lmms_eval_fp": 1, "summary": 1, "plots": 1, "all": 1}


KILL_SCRIPT = """
import os, signal, sys
import vlmquant.export.checkpoint as ck
real = ck.set_safetensors_metadata
def die_after_first_shard(path, extra):
    real(path, extra)
    os.kill(os.getpid(), signal.SIGKILL)
ck.set_safetensors_metadata = die_after_first_shard
from vlmquant.models.loading import open_model
from vlmquant.spec import RunSpec
ck.export_checkpoint(open_model({"family": "qwen2_vl", "path": "results/demo/model-qwen2_vl"}, "cpu"),
                     RunSpec.from_config("rtn-w4g64", {"method": "rtn", "w_bit": 4, "w_group": 64}), sys.argv[1],
                     max_shard_size="4MB")
"""


def add_rtn4(cfg):
    cfg["runs"]["rtn-w4g64"] = {"method": "rtn", "w_bit": 4, "w_group": 64}


def test_half_written_checkpoint_is_never_complete(pipe):
    """A job killed mid-write leaves only a temporary folder; Snakemake redoes the export and it is cleared."""
    target = paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run="rtn-w4g64")
    run_dir = pipe / paths.RUN.format(model=MODEL, calib=CALIB, run="rtn-w4g64")
    with pipe.edited_config(add_rtn4):
        res = subprocess.run([sys.executable, "-c", KILL_SCRIPT, target], cwd=pipe.path, env=snakemake_env(),
                             capture_output=True, text=True)
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        assert not (pipe / target).exists()
        (partial,) = run_dir.glob(".checkpoint.*.tmp")
        assert any(partial.glob("model-*.safetensors"))
        assert pipe.planned(target) == {"export": 1}
        pipe.snakemake(target)
        assert json.loads((pipe / target / "quantization.json").read_text())["w_bit"] == 4
        assert not partial.exists()
    shutil.rmtree(run_dir)


def test_snakemake_killed_during_export_never_leaves_an_incomplete_checkpoint(pipe):
    target = paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run="rtn-w4g64")
    run_dir = pipe / paths.RUN.format(model=MODEL, calib=CALIB, run="rtn-w4g64")
    with pipe.edited_config(add_rtn4):
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", target], cwd=pipe.path, env=snakemake_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while (proc.poll() is None and time.time() < deadline and not list(run_dir.glob(".checkpoint.*"))
               and not (pipe / target).exists()):
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = pipe / target
        # wherever the kill landed: no checkpoint folder, or a complete one
        assert not ckpt.exists() or (ckpt / "quantization.json").is_file()
        pipe.snakemake("--unlock")
        pipe.snakemake(target, "--rerun-incomplete")
        assert (ckpt / "quantization.json").is_file() and not list(run_dir.glob(".checkpoint.*.tmp"))
    shutil.rmtree(run_dir)
    assert pipe.planned() == {}


def test_summary_table_relative_to_fp_and_rtn(pipe, summary):
    s = pd.read_parquet(pipe / paths.SUMMARY_PARQUET).set_index("run")  # the csv rounds to 6 digits
    assert s.loc["fp"].delta_nll_fp == 0 and math.isnan(s.loc["fp"].kl_ratio_rtn)
    assert s.loc["rtn-w3g128"].delta_nll_rtn == 0 and s.loc["rtn-w3g128"].kl_ratio_rtn == 1
    for run in RUNS:
        assert s.loc[run].delta_nll_fp == pytest.approx(s.loc[run].caption_nll - s.loc["fp"].caption_nll, abs=1e-6)
        assert s.loc[run].kl_ratio_rtn == pytest.approx(s.loc[run].kl / s.loc["rtn-w3g128"].kl, rel=1e-5)
    html = (pipe / paths.SUMMARY_HTML).read_text()
    assert html.count("<tr") == len(summary) + 1 and "ΔNLL vs RTN" in html and "KL / RTN" in html


def test_every_output_has_the_usual_permissions(pipe):
    mask = os.umask(0)
    os.umask(mask)
    wrong = [str(p.relative_to(pipe.path)) for p in (pipe / "results").rglob("*")
             if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask
             and p != pipe / "results/demo"]  # a copy of pytest's 0700 temporary folder, not an output
    assert not wrong
    stages = {p.relative_to(pipe / "results").parts[-1] for p in (pipe / "results").rglob("*.safetensors")}
    assert {"model.safetensors", "inputs.safetensors", "grads.safetensors", "fp.safetensors",
            "layer_000.safetensors"} <= stages


def test_terminal_shows_a_status_line_per_search_chunk(pipe):
    err = pipe.first_run.stderr
    for run in ("awq-w3g128", "mbq-w3g128"):
        for chunk in ("000", "002"):
            assert f"[search {MODEL}/{CALIB}/{run}/{chunk}] search: 2/2 [" in err, err[-3000:]


def test_removed_run_folder_is_rebuilt_and_summary_follows_the_targets(pipe):
    run_dir = pipe.run_dir("awq-w3g128")
    keep = pipe.path / "awq-kept"
    shutil.copytree(run_dir, keep, symlinks=True)
    shutil.rmtree(run_dir)
    try:
        assert pipe.planned() == {"search": 2, "merge": 1, "export": 1, "pack": 1, "eval": 1, **DOWNSTREAM_OF_EVAL}
        cache = paths.SCALE_CACHE.format(model=MODEL, calib=CALIB, run="awq-w3g128")
        assert pipe.planned(cache) == {"search": 2, "merge": 1}
    finally:
        shutil.copytree(keep, run_dir, symlinks=True)  # copy2: the times come back too
        shutil.rmtree(keep)
    assert pipe.planned() == {}
    with pipe.edited_config(lambda c: c["targets"].update(runs=["rtn-w3g128", "mbq-w3g128"])):
        assert pipe.planned() == DOWNSTREAM_OF_EVAL
        pipe.snakemake()
        assert list(pd.read_csv(pipe / paths.SUMMARY_CSV).run) == ["fp", "rtn-w3g128", "mbq-w3g128"]
    pipe.snakemake()
    assert list(pd.read_csv(pipe / paths.SUMMARY_CSV).run) == ["fp", *RUNS]


def test_forcerun_a_stage_reruns_it_and_what_follows(pipe):
    """The docs' way to redo a stage (docs/running.md)."""
    assert pipe.planned("--forcerun", "export") == {"export": 3, **DOWNSTREAM_OF_EVAL}  # eval reads no checkpoint
    cache = paths.SCALE_CACHE.format(model=MODEL, calib=CALIB, run="mbq-w3g128")
    assert pipe.planned("--forcerun", cache) == {"merge": 1, "export": 1, "pack": 1, "eval": 1,
                                                 **DOWNSTREAM_OF_EVAL}


def test_scale_cache_from_other_weights_is_refused_at_import_and_export(pipe, tmp_path):
    """The demo model's weights replaced in place (Snakemake does not see inside a folder a rule built): the
    weights fingerprint in the scale cache stops the import and the export with one line."""
    from vlmquant.models.tiny import build_demo_model

    weights = pipe.model_dir / "model.safetensors"
    original = tmp_path / "original.safetensors"
    shutil.copy2(weights, original)
    other = build_demo_model(tmp_path / "other", seed=1)
    run = "awq-imported"
    cache = paths.SCALE_CACHE.format(model=MODEL, calib=CALIB, run=run)

    def add(c):
        c["runs"][run] = {"method": "awq", "w_bit": 3, "w_group": 128,
                          "scale_cache": paths.SCALE_CACHE.format(model=MODEL, calib=CALIB, run="awq-w3g128")}
    try:
        with pipe.edited_config(add):
            shutil.copyfile(other / "model.safetensors", weights)
            res = pipe.snakemake(cache, check=False)
            assert res.returncode != 0
            assert (f"[import_scales {MODEL}/{CALIB}/{run}] error: results/{MODEL}/{CALIB}/awq-w3g128/scale_cache.pt: "
                    "scale cache: was made from other weights than results/demo/model-qwen2_vl holds now") in res.stderr
            shutil.copyfile(original, weights)
            pipe.snakemake(cache)
            shutil.copyfile(other / "model.safetensors", weights)
            res = pipe.snakemake(paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run=run), check=False)
            assert f"[export {MODEL}/{CALIB}/{run}] error: {cache}: scale cache: was made from other weights" in res.stderr
            assert not (pipe / paths.CHECKPOINT.format(model=MODEL, calib=CALIB, run=run)).exists()
    finally:
        shutil.copyfile(original, weights)
        shutil.rmtree(pipe.run_dir(run), ignore_errors=True)
    assert pipe.planned() == {}
