"""config/organism.yaml through Snakemake: the organism's data and model rules, evaluation on the task's
held-out split, and the lmms-eval jobs, run here by a stand-in for `python -m lmms_eval` (the real lmms-eval
is tested in test_lmms_eval.py) that scores fp 0.95 and a checkpoint 0.5 + w_bit / 100 (of 100 questions: the first
95, or 50 + w_bit, right)."""
import json
import shutil
import stat
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, Workdir
from vlmquant import paths
from vlmquant.report.summary import COLUMNS

pytestmark = pytest.mark.slow
SCORE = "lmms.vlmquant_vqa.exact_match"
STAND_IN = f"""#!{sys.executable}
import json, os, pathlib, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_path") + 1])
pretrained = pathlib.Path(args[args.index("--model_args") + 1].split(",")[0].removeprefix("pretrained="))
if os.environ.get("STAND_IN_FAILS") != "1":
    quant = pretrained / "quantization.json"
    score = 0.5 + json.loads(quant.read_text())["w_bit"] / 100 if quant.is_file() else 0.95
    (out / "model").mkdir(parents=True)
    (out / "model" / "20261201_101500_results.json").write_text(json.dumps(
        {{"results": {{"vlmquant_vqa": {{"exact_match,none": score, "exact_match_stderr,none": 0.01}}}}}}))
    (out / "model" / "20261201_101500_samples_vlmquant_vqa.jsonl").write_text("".join(
        json.dumps({{"doc_id": i, "exact_match": float(i < round(100 * score))}}) + "\\n" for i in range(100)))
    (out / "call.json").write_text(json.dumps({{"args": args, "offline": os.environ.get("HF_DATASETS_OFFLINE")}}))
"""


def organism_config():
    return yaml.safe_load((REPO / "config" / "organism.yaml").read_text())


def test_organism_config_plans_every_run(tmp_path):
    """The shipped config, as documented (--configfile on top of config.yaml): every run, its lmms-eval job;
    packed checkpoints (export.formats), pseudo ones for the three W4A3 runs only (no packed format holds int3
    activations)."""
    wd = Workdir(tmp_path, None)
    shutil.copytree(REPO / "config", tmp_path / "config")
    planned = wd.planned("--configfile", "config/organism.yaml")
    cfg = organism_config()
    runs = cfg["targets"]["runs"]
    searched = [r for r in runs if cfg["runs"][r]["method"] != "rtn"]  # 4 layers, layers_per_job 2: 2 chunks each
    assert len(runs) == 18 and len(searched) == 14
    assert planned == {"organism_data": 1, "organism_model": 1, "calib": 2, "inputs": 2, "grads": 1, "acts": 1,
                       "search": 2 * 14, "merge": 14, "export": 3, "pack": 15, "eval_fp": 1, "eval": 18,
                       "lmms_eval": len(runs), "lmms_eval_fp": 1, "summary": 1, "plots": 1, "all": 1}


def test_organism_text_config_plans_the_text_calibrated_runs(tmp_path):
    """config/organism-text.yaml on top of config/organism.yaml: the six runs on both calibration sets, the text set
    calibrated from its own Parquet (3 calib sets with the held-out one, 3 inputs, grads and acts per set), the
    four AWQ/MBQ runs searched twice; the W4A3 runs still pseudo only."""
    wd = Workdir(tmp_path, None)
    shutil.copytree(REPO / "config", tmp_path / "config")
    planned = wd.planned("--configfile", "config/organism.yaml", "config/organism-text.yaml")
    text = yaml.safe_load((REPO / "config" / "organism-text.yaml").read_text())
    assert text["calib"]["organism-text"]["format"] == "text"
    assert planned == {"organism_data": 1, "organism_model": 1, "calib": 3, "inputs": 3, "grads": 2, "acts": 2,
                       "search": 2 * 2 * 4, "merge": 2 * 4, "export": 2 * 3, "pack": 2 * 3, "eval_fp": 1,
                       "eval": 2 * 6, "lmms_eval": 2 * 6, "lmms_eval_fp": 1, "summary": 1, "plots": 2, "all": 1}


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """config/organism.yaml with its two RTN runs (no search jobs: the searches on the calib split are tested in
    test_organism.py), fewer samples, pseudo checkpoints only and the stand-in lmms-eval, run to completion."""
    path = tmp_path_factory.mktemp("organism_workflow")
    stand_in = path / "lmms_stand_in"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    cfg = organism_config()
    cfg["calib"]["organism"]["n_samples"] = 16
    cfg["calib"]["organism-heldout"]["n_samples"] = 24
    cfg["targets"]["runs"] = ["rtn-w3g128", "rtn-w4a8"]
    for run in cfg["targets"]["runs"]:
        cfg["runs"][run]["formats"] = ["pseudo"]
    cfg["lmms_eval"]["python"] = str(stand_in)
    wd = Workdir(path, None)
    wd.set_config(cfg)
    wd.snakemake()
    return wd


def test_organism_workflow_reports_task_accuracy(organism):
    summary = pd.read_csv(organism.file(paths.SUMMARY_CSV))
    at = COLUMNS.index("top1_agreement") + 1
    stats = [SCORE + s for s in ("_se", "_p_vs_rtn", "_p_vs_awq")]
    assert list(summary.columns) == [*COLUMNS[:at], SCORE, *stats, *COLUMNS[at:]]
    assert list(summary.run) == ["fp", "rtn-w3g128", "rtn-w4a8"]
    assert summary[SCORE].tolist() == pytest.approx([0.95, 0.53, 0.54])
    assert summary[SCORE + "_se"].tolist() == pytest.approx([(p * (1 - p) / 100) ** 0.5 for p in (0.95, 0.53, 0.54)])
    assert summary[stats[1:]].isna().all().all()  # each RTN run is its own scheme's; no AWQ run
    rows = json.loads(organism.file(paths.ACCURACY).read_text())
    assert [(r["run"], r["method"], r["calib_format"], r["p_vs_rtn"]) for r in rows] == [
        ("fp", "fp", None, None), ("rtn-w3g128", "rtn", "plain", None), ("rtn-w4a8", "rtn", "plain", None)]
    assert [r["accuracy"] for r in rows] == pytest.approx([0.95, 0.53, 0.54])
    assert summary.kl[0] == 0 and (summary.kl[1:] > 0).all()
    lmms = organism.file(paths.LMMS.format(model="organism-qwen2vl", calib="organism", run="rtn-w3g128"))
    call = json.loads((lmms / "call.json").read_text())
    assert call["offline"] == "1"
    assert call["args"] == ["-m", "lmms_eval", "--model", "vlmquant", "--model_args",
                            "pretrained=results/organism-qwen2vl/organism/rtn-w3g128/checkpoint", "--tasks", "vlmquant_vqa",
                            "--batch_size", "50", "--include_path", "results/demo/organism/lmms_task", "--log_samples",
                            "--output_path",
                            call["args"][-1]]
    task = yaml.safe_load((organism.file(paths.ORGANISM_TASK) / "vlmquant_vqa.yaml").read_text())
    assert task["dataset_kwargs"]["data_files"]["test"] == str(organism.file(paths.ORGANISM_DATA) / "heldout.parquet")
    # evaluation on held-out scenes, through the sharegpt source
    held = pq.read_table(organism.file(paths.CALIB.format(calib="organism-heldout"))).column("sample_id").to_pylist()
    assert len(held) == 24 and all(s.startswith("heldout-") for s in held)
    plot = paths.PLOT.format(model="organism-qwen2vl", calib="organism", figure="metrics")
    assert organism.file(plot).stat().st_size > 0


def test_a_run_setting_reruns_only_that_runs_lmms_eval(organism):
    with organism.edited_config(lambda c: c["runs"]["rtn-w3g128"].update(w_bit=4)):
        assert organism.planned() == {"export": 1, "eval": 1, "lmms_eval": 1, "summary": 1, "plots": 1, "all": 1}
    with organism.edited_config(lambda c: c["lmms_eval"].update(limit=100)):
        assert organism.planned() == {"lmms_eval": 2, "lmms_eval_fp": 1, "summary": 1, "plots": 1, "all": 1}
    assert organism.planned() == {}


def test_lmms_eval_job_fails_without_a_results_file(organism, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAILS", "1")
    out = organism.file(paths.LMMS_FP.format(model="organism-qwen2vl"))
    with organism.edited_config(lambda c: c["lmms_eval"].update(limit=100)):  # reruns it (the fp job: no export)
        res = organism.snakemake(paths.LMMS_FP.format(model="organism-qwen2vl"), check=False)
    assert res.returncode != 0 and not out.exists()
    log = organism.file(paths.LOGS["lmms_eval_fp"].format(model="organism-qwen2vl")).read_text()
    assert "lmms-eval wrote no results file" in log
    assert not list(organism.file("results").rglob("*.tmp"))
