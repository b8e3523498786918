"""The benchmarks run on the CPU at tiny shapes: the search layer and GPTQ (each agrees with its plain loop), the
whole DAG (e2e.py) and the per-stage memory vs depth (memory_depth.py).

The whole-DAG and memory-depth runs take minutes on 2 cores: they are marked `bench`, out of the default run
(`python -m pytest -m bench`); the default run checks that both scripts start, that e2e.py plans the DAG in
order and that one stage runs in its own measured process."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, snakemake_env


def test_search_layer_benchmark_runs_and_matches_the_straightforward_loop(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "search_layer.py", "--shape", "demo", "--samples", "2", "--tokens", "128", "--vision", "48", "--caption", "16",
                    "--grid", "4", "--repeats", "1", "--baseline", "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["alpha"] == result["baseline_alpha"] and result["seconds_per_layer"] > 0
    assert result["loss_token_share"] == 0.5 and result["tflop"] < result["tflop_all_tokens"]


def test_moe_search_benchmark_runs_and_matches_the_straightforward_expert_loop(tmp_path):
    """Qwen3-VL-MoE-shaped layer, tiny: the batched search picks the α of the loop (every group, every expert)."""
    out = tmp_path / "moe.json"
    subprocess.run([sys.executable, "search_moe.py", "--shape", "demo-moe", "--samples", "2", "--tokens", "96",
                    "--vision", "40", "--caption", "16", "--grid", "4", "--repeats", "1", "--baseline", "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["same_alpha"] and result["differing_experts"] == 0 and result["seconds_per_layer"] > 0
    assert sorted(result["seconds_by_group"]) == ["input_layernorm", "mlp.experts.gate_up_proj (per expert)",
                                                  "post_attention_layernorm", "self_attn.v_proj"]
    assert len(result["alpha"][3]) == 8 and result["tokens_per_expert_min_max"][0] > 0


def test_gptq_layer_benchmark_runs_and_matches_the_straightforward_column_loop(tmp_path):
    """Qwen2-VL-shaped layer, tiny: Hessians from the layer's forward, the 7 linears' GPTQ, and the plain column
    loop giving the same codes (fp32 on CPU: at most a rounding tie apart)."""
    out = tmp_path / "gptq.json"
    subprocess.run([sys.executable, "gptq_layer.py", "--shape", "demo", "--samples", "2", "--tokens", "96", "--vision", "64",
                    "--caption", "16", "--repeats", "1", "--baseline", "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["codes_equal_fraction"] > 0.9999 and result["fused_codes_equal_fraction"] > 0.9999 and result["loss_token_share"] == pytest.approx(80 / 96)
    assert result["seconds_per_layer"] == result["hessian_seconds"] + result["gptq_seconds"] > 0
    assert result["columns_per_layer"] == 6 * 256 + 768 and result["scheme"] == "w4a16-asym-g128"


PLAN_AND_ONE_STAGE = """
import argparse, json, sys
from pathlib import Path
import e2e, memory_depth, stages
work = Path(sys.argv[1])
for script in (e2e, memory_depth):
    sys.argv = [script.__file__, "--help"]
    try:
        script.main()
    except SystemExit as end:
        assert end.code == 0, script
data = e2e.write_data(work / "data", 2, 56, seed=1).parent
args = argparse.Namespace(shape="demo", samples=2, eval_samples=2, w_bit=4, layers_per_job=2, stream="always",
                          cap_gib=None, device="cpu")
jobs = dict(e2e.dag(args, work, work / "model", data, data))
print(json.dumps({"order": list(jobs), "calib": stages.run(jobs["calib"]), "out": jobs["calib"]["out"]}))
"""


def test_benchmark_scripts_start_and_e2e_plans_the_dag(tmp_path):
    """What the `bench` tests below run, in seconds: both scripts import and parse their options; e2e.py plans the
    stages of one MBQ run in DAG order (a search job per chunk) and runs the first in a fresh, measured process."""
    res = subprocess.run([sys.executable, "-c", PLAN_AND_ONE_STAGE, str(tmp_path)], cwd=REPO / "benchmarks", check=True,
                         capture_output=True, text=True, env=snakemake_env())
    assert res.stdout.count("usage: ") == 2 and "usage: e2e.py" in res.stdout and "usage: memory_depth.py" in res.stdout
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["order"] == ["calib", "calib_holdout", "inputs", "inputs_holdout", "grads", "acts", "search_000",
                               "search_002", "merge", "export", "eval_fp", "eval"]
    assert 0 < result["calib"]["seconds"] < result["calib"]["process_seconds"]
    assert pd.read_parquet(result["out"]).shape[0] == 2


@pytest.mark.bench
@pytest.mark.slow
def test_e2e_benchmark_runs_the_dag_through_the_library_functions(tmp_path):
    """The stages in DAG order, each in its own process, on a tiny model: every job measured, an eval table made."""
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, "e2e.py", "--shape", "demo", "--samples", "3", "--eval-samples", "2", "--image", "112",
                    "--via", "library", "--stream", "always", "--work", str(tmp_path / "work"), "--keep-results",
                    "--out", str(out)], cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["via"] == "library" and result["order"] == [
        "calib", "calib_holdout", "inputs", "inputs_holdout", "grads", "acts", "search_000", "merge", "export", "eval_fp",
        "eval"]
    assert result["total_seconds"] == pytest.approx(sum(j["process_seconds"] for j in result["jobs"].values()))
    assert all(0 < j["seconds"] < j["process_seconds"] for j in result["jobs"].values())
    table = pd.read_parquet(tmp_path / "work/run/results/e2e/e2e/mbq/eval.parquet")
    assert (table.loc[table.metric == "kl", "value"] > 0).all()


@pytest.mark.bench
@pytest.mark.slow
def test_memory_depth_benchmark_measures_every_stage_at_two_depths(tmp_path):
    out = tmp_path / "depth.json"
    subprocess.run([sys.executable, "memory_depth.py", "--shape", "demo", "--depths", "3,4", "--samples", "2",
                    "--tokens", "80", "--eval-samples", "2", "--vocab", "1024", "--grads-store-mb", "1",
                    "--search-cap-gib", "1", "--root", str(tmp_path / "models"), "--out", str(out)],
                   cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    shallow = result["depths"]["3"]
    assert set(result["ratio_deep_to_shallow"]) == {"grads", "acts", "search", "export", "eval_fp", "eval"}
    assert shallow["capped_same_alpha"] and len(shallow["search_alphas"]) == 2
    assert all(shallow[s]["peak_host_gib"] > 0 for s in result["ratio_deep_to_shallow"])
