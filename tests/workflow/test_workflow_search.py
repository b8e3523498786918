"""End to end through the search: resume after SIGKILL, rerun scope of setting changes."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import snakemake_env
from vlmquant import paths
from vlmquant.io.scales import load_cache

pytestmark = pytest.mark.slow
MBQ = paths.SCALE_CACHE.format(model="demo-qwen2vl", calib="demo", run="mbq-w3g128")
AWQ = paths.SCALE_CACHE.format(model="demo-qwen2vl", calib="demo", run="awq-w3g128")
MBQ_RUN = paths.RUN.format(model="demo-qwen2vl", calib="demo", run="mbq-w3g128")
MBQ_LOGS = os.path.dirname(paths.LOGS["merge"].format(model="demo-qwen2vl", calib="demo", run="mbq-w3g128"))
SCALES = MBQ_RUN + "/scales"  # chunk_NNN/ folders


def one_layer_per_job(cfg):
    cfg["search"]["layers_per_job"] = 1


def test_awq_never_needs_grads(workdir):
    jobs = workdir.planned(AWQ)
    assert "grads" not in jobs and jobs["merge"] == 1
    assert "grads" in workdir.planned(MBQ)


def test_sigkill_mid_search_resumes_unfinished_chunks_to_identical_bytes(tmp_path_factory, pipe):
    ref = pipe.copy(tmp_path_factory.mktemp("ref"))  # its search ran in jobs of two layers, uninterrupted

    # calib, inputs and grads done; the MBQ run's folder and logs gone, acts reruns (chunks of one layer)
    wd = pipe.copy(tmp_path_factory.mktemp("killed"))
    for folder in (MBQ_RUN, MBQ_LOGS):
        shutil.rmtree(wd.file(folder))
    wd.edit(one_layer_per_job)
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", MBQ], cwd=wd.path, env=snakemake_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs = wd.file(MBQ_LOGS)
    scales = wd.file(SCALES)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        # one job at a time: once a chunk is finished and the next one has started, kill everything
        done = {p.parent.name: p.stat().st_mtime_ns for p in scales.glob("chunk_*/layer_*.safetensors")}
        if done and len(list(logs.glob("search_*.log"))) == len(done) + 1:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done and len(done) < 4, "the kill must land mid-search"
    assert not wd.file(MBQ).exists()

    wd.snakemake("--unlock")
    res = wd.snakemake(MBQ, "--rerun-incomplete")
    log = res.stdout + res.stderr
    ran = {f"chunk_{i:03d}" for i in range(4) if f"{SCALES}/chunk_{i:03d}\n" in log}
    assert ran == {f"chunk_{i:03d}" for i in range(4)} - set(done)
    for name, mtime in done.items():
        assert wd.file(f"{SCALES}/{name}/layer_{name[-3:]}.safetensors").stat().st_mtime_ns == mtime
    for rule in ("rule calib:", "rule inputs:", "rule grads:", "rule acts:"):
        assert rule not in log
    assert wd.file(MBQ).read_bytes() == ref.file(MBQ).read_bytes()

    # a different chunking reruns the search (other jobs), never what comes before it, and gives the same bytes
    ref.edit(lambda c: c["search"].update(layers_per_job=4))
    assert ref.planned(MBQ) == {"acts": 1, "search": 1, "merge": 1}  # acts: the chunks start at other layers
    before = ref.file(MBQ).read_bytes()
    ref.snakemake(MBQ)
    assert ref.file(MBQ).read_bytes() == before

    # changing w_bit reruns search and merge only
    wd.edit(lambda c: c["runs"]["mbq-w3g128"].update(w_bit=4))
    assert wd.planned(MBQ) == {"search": 4, "merge": 1}
    # a run without reweight never touches grads, even from a fresh config change
    wd.edit(lambda c: c["runs"]["awq-w3g128"].update(n_grid=10))
    assert "grads" not in wd.planned(AWQ)


def test_distort_run_chains_its_chunks_and_matches_one_job(pipe, tmp_path_factory):
    from vlmquant.io.provenance import with_weights
    from vlmquant.io.scales import chunk_layer_files, merge
    from vlmquant.models.loading import open_model
    from vlmquant.search.pipeline import run_search
    from vlmquant.workflow import check_config, run_specs

    run_dir = paths.RUN.format(model="demo-qwen2vl", calib="demo", run="mbq-distort")
    workdir = pipe.copy(tmp_path_factory.mktemp("distort"))  # calib, inputs and acts done
    workdir.edit(lambda c: c["runs"].update({"mbq-distort": {"method": "mbq", "w_bit": 3, "distort": True}}))
    # chunk 2 of the distort run needs chunk 0's quantized outputs; chunks of other runs stay independent
    assert workdir.planned(f"{run_dir}/scales/chunk_002")["search"] == 2
    assert workdir.planned("--forceall", f"{SCALES}/chunk_002")["search"] == 1
    workdir.snakemake(f"{run_dir}/scale_cache.pt")
    assert sorted(p.name for p in workdir.file(f"{run_dir}/scales/chunk_000").glob("[!.]*")) == [
        "layer_000.safetensors", "layer_001.safetensors", "next_fp_inputs.safetensors", "next_inputs.safetensors"]

    cfg = check_config(workdir.config, workdir.file("workflow/schemas/config.schema.yaml"))
    spec = run_specs(cfg)["mbq-distort"]
    names = {"model": "demo-qwen2vl", "calib": "demo", "run": "mbq-distort"}
    model = open_model({**cfg["models"]["demo-qwen2vl"], "path": str(workdir.file(cfg["models"]["demo-qwen2vl"]["path"]))},
                       "cpu")
    staged, out = workdir.file("results/demo-qwen2vl/demo"), tmp_path_factory.mktemp("one_job")
    run_search(model, spec, staged / "inputs.safetensors", staged / "acts", staged / "grads.safetensors", [0, 1, 2, 3],
               out / "chunk", with_weights(names, model.path))  # as scripts/search.py
    merge(chunk_layer_files([out / "chunk"]), out / "cache.pt", out / "search.parquet",
          with_weights({**names, "run_config": spec.search_params()}, model.path))  # as scripts/merge.py
    assert (out / "cache.pt").read_bytes() == workdir.file(f"{run_dir}/scale_cache.pt").read_bytes()

    # the linears export leaves fp stay fp in a distort run's forwards: export.ignore reruns its search
    workdir.edit(lambda c: c["export"].update(ignore=["mlp.down_proj"]))
    assert workdir.planned(f"{run_dir}/scale_cache.pt") == {"search": 2, "merge": 1}


def test_both_distort_definitions_run_through_every_stage(pipe, tmp_path):
    """The demo with a reference and a layer distort run (chunks of two layers): calib → … → eval → summary;
    only the reference's chunks carry the fp chain, and the two definitions pick different scales."""
    workdir = pipe.copy(tmp_path)  # calib, inputs, grads, acts and the fp eval done: search → … → summary run
    runs = {"distort-reference": "reference", "distort-layer": "layer"}
    workdir.edit(lambda c: (c["runs"].update({name: {"method": "mbq", "w_bit": 3, "n_grid": 4, "distort": d}
                                              for name, d in runs.items()}),
                            c["targets"].update(runs=list(runs))))
    workdir.snakemake()
    caches = {}
    for name, d in runs.items():
        where = {"model": "demo-qwen2vl", "calib": "demo", "run": name}
        for out in (paths.EVAL, paths.PACKED):
            assert workdir.file(out.format(**where)).exists()
        chained = {p.name for p in workdir.file(paths.SCALES.format(**where, chunk="000")).iterdir()}
        assert paths.NEXT_INPUTS in chained and (paths.NEXT_FP_INPUTS in chained) == (d == "reference")
        caches[name] = load_cache(workdir.file(paths.SCALE_CACHE.format(**where)))
        assert caches[name]["meta"]["run_config"]["distort"] == d
    assert sorted(pd.read_csv(workdir.file(paths.SUMMARY_CSV)).run) == sorted([*runs, "fp"])
    scales = [torch.cat([s for _, _, s in c["scale"]]) for c in caches.values()]
    assert not torch.equal(*scales)
