"""The benchmarks run on the CPU at tiny shapes: the search layer and GPTQ (each agrees with its plain loop), the
whole DAG (e2e.py), the per-stage memory vs depth (memory_depth.py) and the MoE pipeline's depth runs and
projection (moe_depth.py).

The whole-DAG and depth runs take minutes on 2 cores: they are marked `bench`, out of the default run
(`python -m pytest -m bench`); the default run checks that the scripts start, that e2e.py plans the DAG in
order, that one stage runs in its own measured process and that moe_depth.py's projection adds up."""
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
    # a rounding tie decided the other way moves that code by one step, and GPTQ carries the error on to the row's
    # later columns (up to 3 steps apart here): 0.99984 of the codes equal on one CPU, all of them on another
    assert result["codes_equal_fraction"] > 0.999 and result["codes_max_difference"] <= 4
    assert result["fused_codes_equal_fraction"] > 0.9999 and result["loss_token_share"] == pytest.approx(80 / 96)
    assert result["seconds_per_layer"] == result["hessian_seconds"] + result["gptq_seconds"] > 0
    assert result["columns_per_layer"] == 6 * 256 + 768 and result["scheme"] == "w4a16-asym-g128"


PLAN_AND_ONE_STAGE = """
import argparse, json, sys
from pathlib import Path
import e2e, memory_depth, moe_depth, stages
work = Path(sys.argv[1])
for script in (e2e, memory_depth, moe_depth):
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
    """What the `bench` tests below run, in seconds: the scripts import and parse their options; e2e.py plans the
    stages of one MBQ run in DAG order (a search job per chunk) and runs the first in a fresh, measured process."""
    res = subprocess.run([sys.executable, "-c", PLAN_AND_ONE_STAGE, str(tmp_path)], cwd=REPO / "benchmarks", check=True,
                         capture_output=True, text=True, env=snakemake_env())
    assert res.stdout.count("usage: ") == 3
    assert all(f"usage: {name}.py" in res.stdout for name in ("e2e", "memory_depth", "moe_depth"))
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["order"] == ["calib", "calib_holdout", "inputs", "inputs_holdout", "grads", "acts", "search_000",
                               "search_002", "merge", "export", "eval_fp", "eval"]
    assert 0 < result["calib"]["seconds"] < result["calib"]["process_seconds"]
    assert pd.read_parquet(result["out"]).shape[0] == 2


SNAKEMAKE_LOG = """SNAKEMAKE
=========
  Date: 2026-12-07 23:22:46
  Workflow ID: c03a10e4-7c42-4a35-ad5b-4f8b93aba53f

Select jobs to execute...
Execute 2 jobs...
[Mon Dec  7 23:22:49 2026]
localrule export:
    input: results/demo/model-qwen2_vl, results/demo-qwen2vl/demo/mbq-w3g128/scale_cache.pt
    jobid: 24
    reason: Missing output files: results/demo-qwen2vl/demo/mbq-w3g128/checkpoint
    wildcards: model=demo-qwen2vl, calib=demo, run=mbq-w3g128
    resources: tmpdir=/tmp, gpu=1
[Mon Dec  7 23:22:49 2026]
rule summary:
    jobid: 1
[Mon Dec  7 23:22:55 2026]
Finished jobid: 24 (Rule: export)
1 of 3 steps (33%) done
[Mon Dec  7 23:22:56 2026]
localrule plots:
    jobid: 26
    wildcards: model=demo-qwen2vl, calib=demo
[Mon Dec  7 23:23:10 2026]
Finished jobid: 1 (Rule: summary)
[Tue Dec  8 00:00:01 2026]
Finished jobid: 26 (Rule: plots)
"""


def test_e2e_timeline_reads_each_jobs_start_and_end_from_the_snakemake_log(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import e2e

    expect = [  # by start, then job id; seconds after the header's Date
        {"rule": "summary", "jobid": 1, "wildcards": "", "start": 3.0, "end": 24.0},
        {"rule": "export", "jobid": 24, "wildcards": "model=demo-qwen2vl, calib=demo, run=mbq-w3g128", "start": 3.0,
         "end": 9.0},
        {"rule": "plots", "jobid": 26, "wildcards": "model=demo-qwen2vl, calib=demo", "start": 10.0, "end": 2235.0}]
    assert e2e.job_timeline(SNAKEMAKE_LOG) == expect
    headless = SNAKEMAKE_LOG.split("Select jobs", 1)[1]  # no header: from the first job's start
    assert e2e.job_timeline(headless) == [{**j, "start": j["start"] - 3, "end": j["end"] - 3} for j in expect]


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


PROJECT = """
import argparse, json, sys
from pathlib import Path
import moe_depth
args = argparse.Namespace(shape="demo-moe", samples=2, tokens=int(sys.argv[1]), grads_store_mb=int(sys.argv[2]))
stage = lambda s, gpu=1.0: {"seconds": s, "peak_gpu_gib": gpu, "peak_host_gib": 2.0}
result = {"sizes": {"layer_bytes_bf16": 1e9, "other_bytes_bf16": 2e9, "packed_layer_bytes": 0.25e9,
                    "packed_other_bytes": 1e9},
          "disk": {"read_used_gbps": 2.0, "write_gbps": 1.0},
          "depths": {"8": {"fingerprint": stage(16.0, 0.0), "grads": stage(12.0, 7.0), "acts": stage(6.0),
                           "search": stage(6.0), "pack": {"failed": "x"}},
                     "4": {"fingerprint": stage(8.0, 0.0), "grads": stage(8.0, 5.0), "acts": stage(4.0),
                           "search": stage(6.0), "export": stage(8.0), "pack": stage(12.0)}}}
moe_depth.project(result, args)
disk = moe_depth.disk_throughput(Path(sys.argv[3]), 1 / 16)
print(json.dumps({"result": result, "disk": disk, "left": [p.name for p in Path(sys.argv[3]).iterdir()],
                  "falling": moe_depth.fit({4: 10.0, 8: 8.0})}))
"""


@pytest.mark.parametrize("tokens, reads", [(10, 6), (20, 8)])
def test_moe_depth_projection_adds_the_disk_terms_to_the_fitted_stage_seconds(tmp_path, tokens, reads):
    """Each stage's seconds on the line through its two depths (fingerprint 8 s at 4 layers, 16 at 8: 0 + 2 s a
    layer; grads 8 at 4, 12 at 8: 4 + 1 a layer; acts 4 at 2 layers, 6 at 6: 3 + 0.5), or at one depth its seconds
    over its layers (search: a 2-layer chunk, 3 s a layer; pack: 12 s at 4 layers, the failed depth-8 pack counts for
    nothing), at 94 layers (a falling line: flat through the deepest depth); plus the reads of 94 GB of layers + 2 GB (fingerprint, acts, search, pack once, grads 2
    per round: its stored inputs 94 x 2 x tokens x 256 x 2 bytes over a 1 MiB cap are 1 round at 10 tokens, 2 at 20)
    and the pack's write. The pseudo export is not in the default pipeline: export_s is what it would add. The disk
    measurement gives positive figures and leaves no file."""
    res = subprocess.run([sys.executable, "-c", PROJECT, str(tokens), "1", str(tmp_path)], cwd=REPO / "benchmarks",
                         check=True, capture_output=True, text=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    result, disk = out["result"], out["disk"]
    projection = result["projection"]
    stage_s = {"fingerprint": 2 * 94, "grads": 4 + 94, "acts": 3 + 0.5 * 94, "search": 3 * 94, "pack": 3 * 94,
               "export": 2 * 94}
    assert projection["stage_s"] == pytest.approx(stage_s)
    assert projection["stages"] == ["acts", "fingerprint", "grads", "pack", "search"]
    model, packed = 94e9 + 2e9, 0.25e9 * 94 + 1e9
    assert projection["reads"] == reads
    total = sum(stage_s.values()) - stage_s["export"] + reads * model / 2e9 + packed / 1e9
    assert result["projected_total_s"] == pytest.approx(total)
    assert projection["export_s"] == pytest.approx(2 * 94 + model / 2e9 + model / 1e9)
    assert result["peak_gpu_gib"] == 7.0 and result["peak_host_gib"] == 2.0
    assert disk["bytes"] == 64 * 2**20 and disk["write_gbps"] > 0 and disk["read_gbps"] > 0
    assert disk["read_used_gbps"] == min(v for v in (disk["read_gbps"], disk["read_direct_gbps"]) if v)
    assert out["left"] == []
    assert out["falling"] == [8.0, 0.0]  # seconds falling with depth (noise): no negative slope, the deepest's


@pytest.mark.bench
@pytest.mark.slow
def test_moe_depth_benchmark_measures_every_stage_at_two_depths(tmp_path):
    """Qwen3-VL-MoE-shaped folders of depth 3 and 4 (demo-moe): every stage runs and is measured at both, the
    export and pack at both too here; the JSON has the projection's top-level keys; --resume keeps the finished
    depths (nothing runs again: the depth-3 figures stay as they were)."""
    out = tmp_path / "moe.json"
    cmd = [sys.executable, "moe_depth.py", "--shape", "demo-moe", "--depths", "3,4", "--write-depths", "3,4",
           "--with-export", "--samples", "2", "--tokens", "80", "--vocab", "1024", "--read-gib", "0.0625",
           "--root", str(tmp_path / "models"), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO / "benchmarks", check=True, capture_output=True)
    result = json.loads(out.read_text())
    for n in ("3", "4"):
        assert set(result["depths"][n]) == {"fingerprint", "grads", "acts", "search", "export", "pack"}
        assert all(m["seconds_per_layer"] > 0 and m["peak_host_gib"] > 0 for m in result["depths"][n].values())
    assert result["projected_total_s"] > result["projection"]["compute_s"] > 0 and result["peak_gpu_gib"] == 0.0
    assert result["projection"]["reads"] == 6 and result["sizes"]["packed_layer_bytes"] > 0
    assert result["projection"]["export_s"] > 0 and "export" not in result["projection"]["stages"]
    assert not (tmp_path / "models/demo-moe-3").exists() and not (tmp_path / "models/demo-moe-4").exists()
    subprocess.run(cmd + ["--resume", "--depths", "3"], cwd=REPO / "benchmarks", check=True, capture_output=True)
    assert json.loads(out.read_text())["depths"] == {"3": result["depths"]["3"]}


REGIME_RUNS = """
import json, sys
import organism_regimes as R
from vlmquant.spec import RunSpec
sys.argv = [R.__file__, "--help"]
try:
    R.main()
except SystemExit as end:
    assert end.code == 0
specs = {name: RunSpec.from_config(name, cfg).scheme for name, cfg in R.runs(["rtn", *R.METHODS], R.SCHEMES).items()}
print(json.dumps({name: [s.w_bit, s.w_group, s.a_bit, s.symmetric] for name, s in specs.items()}))
"""


def test_organism_regimes_benchmark_builds_a_valid_run_per_method_and_scheme():
    """Every scheme of the regime sweep is a run the workflow accepts, with the bits and groups its name says;
    GPTQ only at the weight-only schemes."""
    res = subprocess.run([sys.executable, "-c", REGIME_RUNS], cwd=REPO / "benchmarks", check=True, capture_output=True,
                         text=True, env=snakemake_env())
    schemes = json.loads(res.stdout.strip().splitlines()[-1])
    assert schemes["rtn-w3ch"] == [3, -1, None, False] and schemes["mbq-w2g32"] == [2, 32, None, False]
    assert schemes["awq-w4a3"] == [4, -1, 3, True] and schemes["mbq-w2a8"] == [2, -1, 8, True]
    assert "gptq-w2g64" in schemes and not any(n.startswith("gptq-") and a_bit for n, (_, _, a_bit, _) in schemes.items())
    assert len(schemes) == 4 * 17 - 8  # 17 schemes, 8 of them weight-activation


@pytest.mark.bench
@pytest.mark.slow
def test_organism_regimes_benchmark_scores_the_organism_and_rtn(tmp_path):
    """Snakemake builds the RTN W4A8 checkpoint; the fp model scores the first 200 held-out questions as its training
    record says, and RTN at W4A8 loses too little for the scale searches to run."""
    out = tmp_path / "regimes.json"
    subprocess.run([sys.executable, "organism_regimes.py", "--work", str(tmp_path / "work"), "--schemes", "w4a8",
                    "--limit", "200", "--out", str(out)], cwd=REPO / "benchmarks", check=True, capture_output=True,
                   env=snakemake_env())
    result = json.loads(out.read_text())
    record = json.loads((REPO / "vlmquant/organism/model/training.json").read_text())
    fp, rtn = result["rows"]
    assert fp["run"] == "fp" and fp["accuracy"] == record["heldout_accuracy_first200"]["overall"] and fp["n"] == 200
    assert rtn["run"] == "rtn-w4a8" and abs(rtn["loss_vs_fp_points"]) < 5 and result["separating_schemes"] == []
    assert rtn["accuracy_se"] == pytest.approx((rtn["accuracy"] * (1 - rtn["accuracy"]) / 200) ** 0.5, abs=1e-4)


def test_test_command_benchmark_reads_each_workers_end_and_module_spans(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import test_command

    ev = lambda w, test, kind, t: json.dumps({"worker": w, "test": test, "event": kind, "t": 1000.0 + t})  # noqa: E731
    lines = [ev("gw0", "tests/a.py::t1", "start", 0), ev("gw1", "tests/b.py::t1", "start", 1),
             ev("gw0", "tests/a.py::t1", "end", 4), ev("gw0", "tests/a.py::t2", "start", 4),
             ev("gw0", "tests/a.py::t2", "end", 9), ev("gw1", "tests/b.py::t1", "end", 3),
             ev("gw1", "tests/c.py::t1", "start", 3), ev("gw1", "tests/c.py::t1", "end", 5)]
    assert test_command.workers(lines) == {"gw0": {"end": 9.0, "modules": [["tests/a.py", 0.0, 9.0]]},
                                           "gw1": {"end": 5.0, "modules": []}}  # spans of 5 s or less left out
