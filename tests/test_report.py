"""Report figures and the summary's relative columns on synthetic rows (no workflow run)."""
import math
import re

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmquant.report.plots import plot_metrics, run_colors, run_styles
from vlmquant.eval.table import write_table
from vlmquant.report.summary import random_demo_models, relative_columns, summarize, summary_html

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
    df = pd.DataFrame({"model": "m", "calib": [None, *["c"] * n_runs], "run": runs,
                       "method": [METHODS[r] for r in runs], "w_bit": [16, *[3] * n_runs],
                       "w_group": [None, *[128] * n_runs], "a_bit": None,
                       "caption_nll": 7.36 + rng.uniform(0, 0.02, n_runs + 1), "kl": rng.uniform(0.01, 0.02, n_runs + 1),
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
    panel (a third row) to metrics.png."""
    df = summary_rows(3).assign(top1_agreement=1.0, weight_err=0.1, time_total_s=np.nan)
    df["lmms.vlmquant_vqa.exact_match"] = [0.95, 0.947, 0.952, 0.951]
    headers = re.findall(r"<th>(.*?)</th>", summary_html(df))
    assert headers[headers.index("top-1 agreement") + 1] == "vlmquant_vqa.exact_match"
    assert ">0.947<" in summary_html(df)
    out, plain = tmp_path / "lmms.png", tmp_path / "plain.png"
    styles = run_styles(list(df.run), dict(zip(df.run, df.method)))
    plot_metrics(df, out, "title", styles)
    plot_metrics(df.drop(columns="lmms.vlmquant_vqa.exact_match"), plain, "title", styles)
    with Image.open(out) as a, Image.open(plain) as b:
        assert a.height > 1.4 * b.height


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
