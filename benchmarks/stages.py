"""The workflow's stages as its scripts run them, one fresh Python process each, measured: wall seconds (with and
without the process start-up), peak GPU memory (torch's allocator) and peak host memory (max RSS).

A job is a JSON-able dict: {"stage": name, "cap_gib": GPU memory cap or null, "fingerprints": the weights
fingerprint cache file or null (null: each process hashes the model folder again), ...the stage's arguments}. With a
cap, the process calls torch.cuda.set_per_process_memory_fraction before touching the GPU, as a smaller card
would. Used by e2e.py (the DAG without Snakemake), memory_depth.py and moe_depth.py.

    python stages.py --child '<job json>'      (what `run` starts)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def model_ref(job):
    from vlmquant.models.loading import open_model

    return open_model(job["model"], job.get("device", "auto"), job.get("memory"))


def spec(job):
    from vlmquant.spec import RunSpec

    return RunSpec.from_params(job["run"], job["run_config"])


def stage_fingerprint(job):
    """The model folder's weights fingerprint, as the workflow computes it once at load (io.provenance), into the
    job's fingerprint cache: the later stages of the same folder look it up, as workflow jobs do."""
    from vlmquant.io.provenance import weights_fingerprint

    weights_fingerprint(job["model"]["path"])


def stage_calib(job):
    from vlmquant.data.calib import build_calib

    build_calib(job["cfg"], job["out"], name=job["name"])


def stage_inputs(job):
    from vlmquant.data.inputs import build_inputs
    from vlmquant.models.loading import open_model

    build_inputs(job["calib"], open_model(job["model"], "cpu"), job["out"], name=job["name"])


def stage_grads(job):
    from vlmquant.search.pipeline import run_grads

    run_grads(model_ref(job), job["inputs"], job["out"], batch_size=job.get("batch_size", 4))


def stage_acts(job):
    from vlmquant.search.pipeline import run_acts

    run_acts(model_ref(job), job["inputs"], job["starts"], job["out"])


def stage_search(job):
    from vlmquant.io.provenance import with_weights
    from vlmquant.search.pipeline import run_search

    model = model_ref(job)
    run_search(model, spec(job), job["inputs"], job["start"], job.get("grads"), job["layers"], job["out"],
               with_weights(job["names"], model.path))


def stage_merge(job):
    from vlmquant.io.provenance import with_weights
    from vlmquant.io.scales import chunk_layer_files, merge

    merge(chunk_layer_files(job["chunks"]), job["cache"], job["table"], with_weights(job["expect"], job["model"]["path"]))


def stage_export(job):
    from vlmquant.export import export_checkpoint

    model = model_ref(job)
    export_checkpoint(model, spec(job), job["out"], cache_path=job.get("cache"),
                      max_shard_size=job.get("max_shard_size", "5GB"), names=job["names"])


def stage_pack(job):
    from vlmquant.export.packed import export_packed

    model = model_ref(job)
    export_packed(model, spec(job), job["out"], cache_path=job.get("cache"),
                  max_shard_size=job.get("max_shard_size", "5GB"), names=job["names"])


def stage_eval_fp(job):
    from vlmquant.eval.run import run_fp_reference

    run_fp_reference(model_ref(job), job["inputs"], job["ref"], job["table"], job["settings"], job["ids"])


def stage_eval(job):
    from vlmquant.eval.run import RunWeights, run_eval

    weights = RunWeights(spec(job), job.get("cache"), job["names"])
    run_eval(model_ref(job), weights, job["inputs"], job["ref"], job["table"], job["settings"], job["ids"])


STAGES = {name.removeprefix("stage_"): f for name, f in globals().items() if name.startswith("stage_")}


def child(job):
    import logging

    import torch

    from vlmquant.io.fingerprint import use_cache

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_cache(job.get("fingerprints"))  # the workflow's jobs share one cache (paths.FINGERPRINTS)
    cuda = torch.cuda.is_available()
    if cuda and job.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(job["cap_gib"] * 2**30 / total)
    t = time.perf_counter()
    STAGES[job["stage"]](job)
    if cuda:
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                      "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
                      "peak_host_gib": peak_host_gib()}))


def peak_host_gib():
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries that across
    exec, so a stage would report at least the peak of the benchmark script that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(job, log=None):
    """Run one stage in a fresh process; its measurements plus "process_seconds" (start-up and imports included).
    The process's output goes to `log` (a path) when given. Raises SystemExit with the output's tail on failure."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    if job.get("cap_gib"):
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation under a cap
    t = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(res.stdout + res.stderr)
    if res.returncode:
        raise SystemExit(f"stage {job['stage']} failed:\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"] = wall
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    child(json.loads(ap.parse_args().child))
