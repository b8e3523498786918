"""Report figures and the summary's relative columns on synthetic rows (no workflow run)."""
import dataclasses
import hashlib
import json
import math
import re

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import binomtest
from pathlib import Path

from vlmquant.report.plots import plot_metrics, run_colors, run_styles
from vlmquant import paths
from vlmquant.eval.table import write_table
from vlmquant.quant.scheme import Scheme
from vlmquant.report.all_runs import ALL_RUNS_COLUMNS, all_runs
from vlmquant.workflow.inputs import other_tables
from vlmquant.report.accuracy import accuracy_rows, write_accuracy
from vlmquant.report.summary import COLUMNS, random_demo_models, relative_columns, summarize, summary_html

METHODS = {"fp": "fp", **{f"mbq-{k}": "mbq" for k in range(4)}, **{f"awq-{k}": "awq" for k in range(3)},
           **{f"rtn-{k}": "rtn" for k in range(3)}, "sq": "smoothquant", "gptq-like": "other"}


def test_every_run_its_colour_methods_a_hue_family():
    colors = run_colors(list(METHODS), METHODS)
    assert len({mcolors.to_hex(c) for c in colors.values()}) == len(METHODS)
    hue = {run: mcolors.rgb_to_hsv(mcolors.to_rgb(c))[0] * 360 for run, c in colors.items()}
    for k in range(4):
        assert 80 < hue[f"mbq-{k}"] < 160  # greens
    for k in range(3):
        assert 190 < hue[f"awq-{k}"] < 240 and (hue[f"rtn-{k}"] < 20 or hue[f"rtn-{k}"] > 340)  # blues, reds
    assert mcolors.rgb_to_hsv(mcolors.to_rgb(colors["fp"]))[1] < 0.05  # grey
    styles = run_styles(list(METHODS), METHODS)
    assert len({styles[f"mbq-{k}"][1:] for k in range(4)}) == 4  # line style + marker differ within a method


def summary_rows(n_runs):
    runs = ["fp", *list(METHODS)[1:n_runs + 1]]
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"model": "m", "calib": [None, *["c"] * n_runs], "run": runs, "eval_calib": "e",
                       "method": [METHODS[r] for r in runs], "scheme": ["bfloat16", *["w3a16-asym-g128"] * n_runs],
                       "w_bit": [16, *[3] * n_runs],
                       "w_group": [None, *[128] * n_runs], "a_bit": None,
                       "caption_nll": 7.36 + rng.uniform(0, 0.02, n_runs + 1),
                       "kl": rng.uniform(0.01, 0.02, n_runs + 1),
                       "hidden_err_vision": rng.uniform(0.1, 0.2, n_runs + 1),
                       "hidden_err_text": rng.uniform(0.1, 0.2, n_runs + 1)})
    df.loc[0, ["kl", "hidden_err_vision", "hidden_err_text"]] = 0.0
    return relative_columns(df)


def test_relative_columns():
    df = summary_rows(12).set_index("run")
    assert df.loc["fp"].delta_nll_fp == 0 and math.isnan(df.loc["fp"].delta_nll_rtn)
    assert df.loc["mbq-1"].delta_nll_fp == pytest.approx(df.loc["mbq-1"].caption_nll - df.loc["fp"].caption_nll)
    # the first RTN row of the same model, calib, bits and group is the reference
    assert df.loc["awq-2"].kl_ratio_rtn == pytest.approx(df.loc["awq-2"].kl / df.loc["rtn-0"].kl)
    assert df.loc["rtn-0"].delta_nll_rtn == 0 and df.loc["rtn-0"].kl_ratio_rtn == 1
    html = summary_html(df.reset_index().assign(top1_agreement=1.0, weight_err=0.1, time_total_s=np.nan))
    assert html.count("<tr") == 14 and "&lt;NA&gt;" not in html and ">nan<" not in html


@pytest.mark.parametrize("n_runs", [3, 12])
def test_metrics_figure_grows_with_the_runs_and_starts_at_zero(tmp_path, n_runs):
    df = summary_rows(n_runs)
    out = tmp_path / "metrics.png"
    plot_metrics(df, out, "title", run_styles(list(df.run), dict(zip(df.run, df.method))))
    with Image.open(out) as img:
        height = img.height
    assert height >= 120 * (2.2 + 0.62 * max(n_runs + 1, 3)) * 0.9  # 0.62 in of figure per run (dpi 120)


def test_lmms_scores_in_the_table_and_the_metrics_figure(tmp_path):
    """An lmms-eval score column (lmms.<task>.<metric>) follows top-1 agreement in summary.html and adds a
    panel (a third row) to metrics.png; its standard error and p-value columns add none."""
    df = summary_rows(3).assign(top1_agreement=1.0, weight_err=0.1, time_total_s=np.nan)
    df["lmms.vlmquant_vqa.exact_match"] = [0.95, 0.947, 0.952, 0.951]
    headers = re.findall(r"<th>(.*?)</th>", summary_html(df))
    assert headers[headers.index("top-1 agreement") + 1] == "vlmquant_vqa.exact_match"
    assert ">0.947<" in summary_html(df)
    out, plain = tmp_path / "lmms.png", tmp_path / "plain.png"
    styles = run_styles(list(df.run), dict(zip(df.run, df.method)))
    plot_metrics(df, out, "title", styles)
    plot_metrics(df.drop(columns="lmms.vlmquant_vqa.exact_match"), plain, "title", styles)
    stats = tmp_path / "stats.png"
    plot_metrics(df.assign(**{"lmms.vlmquant_vqa.exact_match_se": 0.007, "lmms.vlmquant_vqa.exact_match_p_vs_rtn": 0.5,
                              "lmms.vlmquant_vqa.exact_match_p_vs_awq": 0.5}), stats, "title", styles)
    with Image.open(out) as a, Image.open(plain) as b, Image.open(stats) as c:
        assert a.height > 1.4 * b.height and c.size == a.size


def test_summary_says_when_a_model_is_the_random_demo(tmp_path):
    """From the fp table's model_path: the demo rules' random-init models, not the trained organism nor a user's."""
    tables = []
    for model, path in (("demo-llava", "results/demo/model-llava"), ("organism", "results/demo/organism/model"),
                        ("real", "/models/Qwen2-VL-7B-Instruct")):
        out = tmp_path / f"{model}.parquet"
        ids = {"model": model, "calib": None, "run": "fp", "eval_calib": "e"}
        write_table([("caption_nll", None, "text", 7.0)], out, ids, {**ids, "method": "fp", "model_path": path})
        tables.append({"model": model, "calib": None, "run": "fp", "path": str(out)})
    assert random_demo_models(tables) == ["demo-llava"]
    assert summarize(tables, {}).attrs["random_demo"] == ["demo-llava"]
    df = summary_rows(3).assign(top1_agreement=1.0, weight_err=0.1, time_total_s=np.nan)
    assert "random-init" not in summary_html(df)
    df.attrs["random_demo"] = ["m"]
    assert ("<body><p><b>m: the random-init demo model. Its differences between methods are noise; "
            "config/organism.yaml quantizes a trained model.</b></p><table") in summary_html(df)


def eval_table(path, run, nll, kl, scheme=None, method="rtn", model="m", calib="c", eval_calib="e", run_config=None):
    """An eval table (fp: scheme None) as eval/run.py writes it, with a caption NLL and KL and two layers."""
    fp = scheme is None
    ids = {"model": model, "calib": None if fp else calib, "run": "fp" if fp else run, "eval_calib": eval_calib}
    rows = [("n_samples", None, None, 6), ("n_caption_tokens", None, None, 50), ("caption_nll", None, "caption", nll),
            ("caption_ppl", None, "caption", math.exp(nll)), ("kl", None, "caption", kl),
            ("top1_agreement", None, "caption", 1.0 if fp else 0.9)]
    rows += [("hidden_rel_mse", i, mod, 0.0 if fp else 0.1 * (i + 1)) for i in range(2) for mod in ("vision", "text")]
    rows += [] if fp else [("weight_rel_err", i, None, 0.05) for i in range(2)]
    if fp:
        meta = {"method": "fp", "dtype": "bfloat16"}
    else:
        meta = {"method": method, "w_bit": scheme.w_bit, "w_group": None if scheme.a_bit else scheme.w_group,
                "a_bit": scheme.a_bit, "quantization": {"scheme": dataclasses.asdict(scheme),
                                                        "run_config": {"method": method, **(run_config or {})}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(rows, path, ids, {**ids, **meta})
    return {"model": model, "calib": ids["calib"], "run": ids["run"], "path": str(path)}


W8A8 = Scheme(8, -1, True, a_bit=8)
FP8 = Scheme(8, -1, True, "float", 8, "float")


def test_scheme_tells_fp8_from_int8_w8a8_and_picks_the_rtn_of_the_same_scheme(tmp_path):
    tables = [eval_table(tmp_path / "fp.parquet", "fp", 2.0, 0.0),
              eval_table(tmp_path / "1.parquet", "rtn-w8a8", 2.10, 0.04, W8A8),
              eval_table(tmp_path / "2.parquet", "rtn-fp8", 2.05, 0.02, FP8),
              eval_table(tmp_path / "3.parquet", "sq-w8a8", 2.04, 0.01, W8A8, "smoothquant"),
              eval_table(tmp_path / "4.parquet", "sq-fp8", 2.01, 0.01, FP8, "smoothquant")]
    df = summarize(tables, {})
    assert list(df.columns) == COLUMNS
    html = summary_html(df)
    df = df.set_index("run")
    assert df.scheme.to_dict() == {"fp": "bfloat16", "rtn-w8a8": "w8a8-sym-ch", "rtn-fp8": "fp8",
                                   "sq-w8a8": "w8a8-sym-ch", "sq-fp8": "fp8"}
    assert df.loc["sq-fp8"].kl_ratio_rtn == pytest.approx(0.01 / 0.02)  # FP8's RTN, not int8's
    assert df.loc["sq-w8a8"].delta_nll_rtn == pytest.approx(2.04 - 2.10)
    assert ">fp8<" in html and ">w8a8-sym-ch<" in html


def test_all_runs_keeps_every_table_present(tmp_path, monkeypatch):
    """Runs dropped from the targets stay in all_runs.csv, marked target=False; each run is compared with the fp
    table of its own eval set; other_tables lists exactly the tables outside the targets, with their sha256."""
    monkeypatch.chdir(tmp_path)
    w3 = Scheme(3, 128)

    def ev(**ids):
        return paths.EVAL.format(**ids)

    targets = [eval_table(Path(paths.FP_TABLE.format(model="m", eval_calib="e")), "fp", 2.0, 0.0)["path"],
               eval_table(Path(ev(model="m", calib="c", run="rtn")), "rtn", 2.3, 0.04, w3)["path"],
               eval_table(Path(ev(model="m", calib="c", run="mbq")), "mbq", 2.1, 0.02, w3, "mbq")["path"]]
    old = [eval_table(Path(ev(model="m", calib="c", run="awq")), "awq", 2.2, 0.03, w3, "awq")["path"],
           eval_table(Path(paths.FP_TABLE.format(model="m", eval_calib="e2")), "fp", 3.0, 0.0, eval_calib="e2")["path"],
           eval_table(Path(ev(model="m", calib="c2", run="mbq")), "mbq", 3.5, 0.05, w3, "mbq", calib="c2",
                      eval_calib="e2")["path"]]
    others = other_tables(targets)
    assert others == {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sorted(old)}
    df = all_runs(targets, list(others))
    assert list(df.columns) == ALL_RUNS_COLUMNS
    assert list(zip(df.eval_calib, df.run, df.calib.fillna("-"), df.target)) == [
        ("e", "fp", "-", True), ("e", "awq", "c", False), ("e", "mbq", "c", True), ("e", "rtn", "c", True),
        ("e2", "fp", "-", False), ("e2", "mbq", "c2", False)]
    by = df.set_index(["eval_calib", "run"])
    assert by.loc[("e2", "mbq")].delta_nll_fp == pytest.approx(0.5)  # against e2's fp table, not e's
    assert by.loc[("e", "awq")].kl_ratio_rtn == pytest.approx(0.03 / 0.04)
    assert math.isnan(by.loc[("e2", "mbq")].kl_ratio_rtn)  # no RTN run on that calib and eval set


def lmms_folder(path, correct):
    """An lmms-eval output folder (results and --log_samples file) with 0/1 exact_match per question."""
    folder = path / "lmms__m"
    folder.mkdir(parents=True)
    results = {"results": {"vlmquant_vqa": {"exact_match,none": sum(correct) / len(correct)}},
               "n-samples": {"vlmquant_vqa": {"effective": len(correct)}}}
    (folder / "20261201_101500_results.json").write_text(json.dumps(results))
    lines = [json.dumps({"doc_id": i, "exact_match": float(x)}) for i, x in enumerate(correct)]
    (folder / "20261201_101500_samples_vlmquant_vqa.jsonl").write_text("\n".join(lines) + "\n")
    return str(path)


def test_standard_errors_and_paired_tests_against_rtn_and_plain_awq(tmp_path):
    """p_vs_rtn pairs with the RTN run of the same scheme on any calibration set (RTN reads none), p_vs_awq with
    the AWQ run of the same calibration set without GPTQ; the p-values are binomial tails of the discordant
    questions, checked with scipy; accuracy.json carries them with the calibration format."""
    w3, w4 = Scheme(3, 128), Scheme(4, 128)
    correct = {  # 20 questions each
        "fp": "11111111111111111110", "rtn": "11111111110000000000", "awq": "11111111111111000000",
        "awq-gptq": "11111111111111111000", "mbq": "11111111111111110100", "mbq-text": "11111111111110000001",
        "mbq-w4": "11111111111111111111"}
    specs = {"fp": (None, "fp", "c", None), "rtn": (w3, "rtn", "c", None), "awq": (w3, "awq", "c", None),
             "awq-gptq": (w3, "awq", "c", {"gptq": True}), "mbq": (w3, "mbq", "c", None),
             "mbq-text": (w3, "mbq", "t", None), "mbq-w4": (w4, "mbq", "c", None)}
    tables = []
    for i, (run, (scheme, method, calib, run_config)) in enumerate(specs.items()):
        table = eval_table(tmp_path / f"{i}.parquet", run, 2.0, 0.01, scheme, method, calib=calib,
                           run_config=run_config)
        table["lmms"] = lmms_folder(tmp_path / f"lmms{i}", [int(x) for x in correct[run]])
        table["calib_format"] = None if run == "fp" else "text" if calib == "t" else "plain"
        tables.append(table)
    df = summarize(tables, {})
    col = "lmms.vlmquant_vqa.exact_match"
    at = list(df.columns).index(col)
    assert list(df.columns)[at:at + 4] == [col, f"{col}_se", f"{col}_p_vs_rtn", f"{col}_p_vs_awq"]
    by = df.set_index("run")

    def p(a, b):
        x, y = correct[a], correct[b]
        only_a = sum(1 for u, v in zip(x, y) if u > v)
        return binomtest(only_a, sum(1 for u, v in zip(x, y) if u != v), 0.5).pvalue

    assert by.loc["awq", f"{col}_se"] == pytest.approx(math.sqrt(0.7 * 0.3 / 20))
    assert by.loc["fp", f"{col}_se"] == pytest.approx(math.sqrt(0.95 * 0.05 / 20))
    for run in ("awq", "awq-gptq", "mbq", "mbq-text"):
        assert by.loc[run, f"{col}_p_vs_rtn"] == pytest.approx(p(run, "rtn"))
    assert by.loc["mbq", f"{col}_p_vs_awq"] == pytest.approx(p("mbq", "awq"))  # the plain AWQ, not AWQ+GPTQ
    assert by.loc["awq-gptq", f"{col}_p_vs_awq"] == pytest.approx(p("awq-gptq", "awq"))
    for run, name in (("fp", "rtn"), ("fp", "awq"), ("rtn", "rtn"), ("awq", "awq"), ("mbq-text", "awq"),
                      ("mbq-w4", "rtn"), ("mbq-w4", "awq")):
        assert math.isnan(by.loc[run, f"{col}_p_vs_{name}"]), (run, name)  # itself, or no such run
    assert by.gptq.to_dict() == {r: r == "awq-gptq" for r in specs}
    out = tmp_path / "accuracy.json"
    write_accuracy(df, out)
    rows = {(r["calib"], r["run"]): r for r in json.loads(out.read_text())}
    assert rows[("t", "mbq-text")] == {
        "model": "m", "calib": "t", "run": "mbq-text", "method": "mbq", "scheme": "w3a16-asym-g128",
        "calib_format": "text", "score": "vlmquant_vqa.exact_match", "accuracy": 0.7,
        "accuracy_se": pytest.approx(math.sqrt(0.7 * 0.3 / 20)), "p_vs_rtn": pytest.approx(p("mbq-text", "rtn")),
        "p_vs_awq": None}
    assert rows[("c", "awq-gptq")]["method"] == "awq+gptq" and rows[(None, "fp")]["method"] == "fp"
    assert rows[(None, "fp")]["p_vs_rtn"] is None and rows[(None, "fp")]["calib_format"] is None
    csv = tmp_path / "summary.csv"
    df.to_csv(csv, index=False)
    assert accuracy_rows(pd.read_csv(csv)) == json.loads(out.read_text())  # the same from summary.csv


def test_accuracy_table_is_empty_without_lmms_eval(tmp_path):
    df = summarize([eval_table(tmp_path / "fp.parquet", "fp", 2.0, 0.0)], {})
    assert accuracy_rows(df) == []
