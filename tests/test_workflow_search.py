"""End to end through the search: resume after SIGKILL, rerun scope of setting changes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Workdir, snakemake_env

pytestmark = pytest.mark.slow
MBQ = "results/demo-qwen2vl/demo/mbq-w3g128/scale_cache.pt"
AWQ = "results/demo-qwen2vl/demo/awq-w3g128/scale_cache.pt"
SCALES = "results/demo-qwen2vl/demo/mbq-w3g128/scales"


def one_layer_per_job(cfg):
    cfg["search"]["layers_per_job"] = 1


def test_awq_never_needs_grads(workdir):
    jobs = workdir.planned(AWQ)
    assert "grads" not in jobs and jobs["merge"] == 1
    assert "grads" in workdir.planned(MBQ)


def test_sigkill_mid_search_resumes_unfinished_chunks_to_identical_bytes(tmp_path_factory, demo_root):
    ref = Workdir(tmp_path_factory.mktemp("ref"), demo_root)
    ref.edit(one_layer_per_job)
    ref.snakemake(MBQ)

    wd = Workdir(tmp_path_factory.mktemp("killed"), demo_root)
    wd.edit(one_layer_per_job)
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", MBQ], cwd=wd.path, env=snakemake_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs, scales = wd.file("results/logs/demo-qwen2vl/demo/mbq-w3g128"), wd.file(SCALES)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        # one job at a time: once a chunk is finished and the next one has started, kill everything
        done = {p.name: p.stat().st_mtime_ns for p in scales.glob("layer_*.safetensors")}
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
    ran = {f"layer_{i:03d}.safetensors" for i in range(4) if f"rule search_demo_qwen2vl_{i:03d}:" in log}
    assert ran == {f"layer_{i:03d}.safetensors" for i in range(4)} - set(done)
    for name, mtime in done.items():
        assert wd.file(f"{SCALES}/{name}").stat().st_mtime_ns == mtime
    for rule in ("rule calib:", "rule inputs:", "rule grads:", "rule acts:"):
        assert rule not in log
    assert wd.file(MBQ).read_bytes() == ref.file(MBQ).read_bytes()

    # a different chunking gives the same bytes too (the layer files are simply reused)
    ref.edit(lambda c: c["search"].update(layers_per_job=4))
    assert ref.planned(MBQ).get("grads") is None

    # changing w_bit reruns search and merge only
    wd.edit(lambda c: c["runs"]["mbq-w3g128"].update(w_bit=4))
    jobs = wd.planned(MBQ)
    assert set(jobs) == {"merge"} | {f"search_demo_qwen2vl_{i:03d}" for i in range(4)}
    # a run without reweight never touches grads, even from a fresh config change
    wd.edit(lambda c: c["runs"]["awq-w3g128"].update(n_grid=10))
    assert "grads" not in wd.planned(AWQ)
