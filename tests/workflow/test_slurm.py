"""Cluster execution: scheduler resources of the rules (the estimates: tests/test_resources.py), and the demo
through a real single-node SLURM.

The SLURM tests install Debian's slurm packages and start slurmctld, slurmd and munged as root
(tests/slurm/slurm-up.sh); without root or apt-get they skip, except in CI (CI=true), where they fail.
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, Workdir, parse_job_stats, snakemake_env
from vlmquant import paths
from vlmquant.workflow import BASE_MB, model_params

pytestmark = pytest.mark.slow
MODEL = "demo-qwen2vl"
RUN = "mbq-w3g128"
CACHE = paths.SCALE_CACHE.format(model=MODEL, calib="demo", run=RUN)
CANCELLED = "search_000"  # a job: its rule, and for search jobs the chunk
MODEL_RULES = {"grads", "acts", "search", "export", "pack", "eval_fp", "eval"}
MODEL_JOBS = MODEL_RULES - {"search"} | {"search_000", "search_002"}
SLURM_DIR = REPO / "tests" / "slurm"
# the test cluster: partition `debug`, 2 cores, no accounting database (job states from squeue, first after 1 s)
SLURM_ARGS = ("--profile", "workflow/profiles/slurm", "--jobs", "4", "--default-resources", "slurm_partition=debug",
              "runtime=10", "cpus_per_task=1", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs")


def one_run_on_cpu(cfg):
    """The demo with one MBQ run (every rule kind: grads, acts, chunks, merge, export, pack, eval), on the CPU."""
    cfg["device"] = "cpu"
    cfg["export"]["formats"] = ["pseudo", "compressed-tensors"]
    cfg["targets"]["runs"] = [RUN]


# --- resources of the rules (no scheduler needed) ------------------------------------------------
def planned_resources(workdir, *args):
    """{rule: resources} of every job `snakemake -n` plans."""
    res = workdir.snakemake("-n", "--forceall", *args)
    out, rule = {}, None
    for line in (res.stdout + res.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\S+):$", line):
            rule = m.group(1)
        elif (m := re.match(r"^\s+resources: (.*)$", line)) and rule:
            out[rule] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return out


def test_gpu_resource_follows_device(workdir):
    workdir.edit(one_run_on_cpu)
    cpu = planned_resources(workdir)
    workdir.edit(lambda c: c.update(device="auto"))
    auto = planned_resources(workdir)
    assert MODEL_RULES <= set(cpu) and set(auto) == set(cpu)
    for rule in MODEL_RULES:
        assert (cpu[rule]["gpu"], auto[rule]["gpu"]) == ("0", "1"), rule
    assert not any("gpu" in r for rule, r in auto.items() if rule not in MODEL_RULES)




def test_rules_ask_for_the_estimate_or_the_config(workdir):
    workdir.edit(one_run_on_cpu)
    fp32_mb = model_params(str(workdir.file(paths.DEMO_MODEL.format(family="qwen2_vl")))) * 4 / 2**20
    mem = {rule: int(r["mem_mb"]) for rule, r in planned_resources(workdir).items() if rule in MODEL_RULES}
    # whole-model jobs: 1.5 × the fp32 weights; a search chunk: 3 × its half of the layers, the same here
    assert mem == dict.fromkeys(MODEL_RULES, BASE_MB + math.ceil(1.5 * fp32_mb))
    workdir.edit(lambda c: (c["search"].update(mem_mb=5000), c["eval"].update(mem_mb=7000)))
    mem = {rule: int(r["mem_mb"]) for rule, r in planned_resources(workdir).items() if rule in MODEL_RULES}
    assert {mem[r] for r in ("grads", "acts", "search")} == {5000}
    assert mem["eval"] == mem["eval_fp"] == 7000 and mem["export"] not in (5000, 7000)


# --- a real single-node SLURM --------------------------------------------------------------------
def unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM test cluster: {reason} (CI must run the SLURM tests)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    """A single-node SLURM on this machine for the module; its daemons are stopped at the end, always."""
    if os.geteuid() != 0:
        unavailable("needs root to install and start SLURM")
    if not shutil.which("apt-get"):
        unavailable("needs apt-get to install SLURM (Debian/Ubuntu)")
    try:
        up = subprocess.run(["bash", SLURM_DIR / "slurm-up.sh"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            unavailable(f"slurm-up.sh failed: {(up.stderr or up.stdout).strip()[-500:]}")
        yield
    finally:
        subprocess.run(["bash", SLURM_DIR / "slurm-down.sh"], capture_output=True, timeout=120)


def slurm_jobs():
    """{SLURM job id: (state, comment)}; the comment is rule_<rule>[_wildcards_…]."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], capture_output=True, text=True,
                         check=True).stdout
    return {int(i): (state, comment) for i, state, comment in (line.split("|", 2) for line in out.splitlines())}


def job_of(comment):
    """The job of a SLURM comment rule_<rule>[_wildcards_<w1>_<w2>…]: its rule, and for search jobs the chunk
    (the last wildcard), e.g. search_000."""
    rule, wildcards = re.match(r"rule_(.+?)(?:_wildcards_(.*))?$", comment).groups()
    return f"{rule}_{wildcards.rsplit('_', 1)[1]}" if rule == "search" else rule


class Detached:
    """Snakemake in its own session (as from a login shell that may go away), output to a file."""

    def __init__(self, cwd, log, *args):
        self.log = Path(log)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=cwd,
                                         env=snakemake_env(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"snakemake ran over {timeout} s:\n{self.text[-4000:]}")

    def stop(self):
        """Interrupt it if still running, as Ctrl-C does: Snakemake then cancels its SLURM jobs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def text(self):
        return self.log.read_text()


def submitted(run):
    """{SLURM job id: job (job_of)} of the jobs a Snakemake run submitted ('… submitted with SLURM jobid N')."""
    jobs = slurm_jobs()
    return {i: job_of(jobs[i][1]) for i in map(int, re.findall(r"submitted with SLURM jobid (\d+)", run.text))}


def cancel_when_running(run, job, started, timeout=300):
    """scancel the SLURM job `job` (job_of) once the file `started` exists; returns its job id."""
    deadline = time.time() + timeout
    while run.proc.poll() is None and time.time() < deadline:
        jobs = [i for i, (state, c) in slurm_jobs().items() if state == "RUNNING" and job_of(c) == job]
        if jobs and started.exists():
            subprocess.run(["scancel", str(jobs[0])], check=True)
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no running {job} job to cancel:\n{run.text[-4000:]}")


@pytest.fixture(scope="module")
def cluster(slurm, tmp_path_factory, demo_root):
    """The demo through SLURM: a search chunk cancelled mid-run, then the same command again."""
    wd = Workdir(tmp_path_factory.mktemp("slurm"), demo_root)
    wd.edit(one_run_on_cpu)
    t0 = time.time()
    # no automatic retry here, so that the cancelled chunk stays failed until the rerun
    first = Detached(wd.path, wd.path / "first.log", *SLURM_ARGS, "--retries", "0")
    try:
        log = wd.file(paths.LOGS["search"].format(model=MODEL, calib="demo", run=RUN, chunk="000"))
        cancelled = cancel_when_running(first, CANCELLED, log)
        first.wait(300)
        t1 = time.time()
        second = Detached(wd.path, wd.path / "second.log", *SLURM_ARGS)
        assert second.wait(300) == 0, second.text[-4000:]
    finally:
        first.stop()
    print(f"\nSLURM: first run (cancelled) {t1 - t0:.0f} s, rerun {time.time() - t1:.0f} s")
    return wd, first, second, cancelled


@pytest.fixture(scope="module")
def local(tmp_path_factory, demo_root):
    """The same run without SLURM, up to its scale cache (grads, acts, search chunks, merge)."""
    wd = Workdir(tmp_path_factory.mktemp("local"), demo_root)
    wd.edit(one_run_on_cpu)
    wd.snakemake(CACHE)
    return wd


@pytest.mark.slow
def test_jobs_ran_as_slurm_jobs(cluster):
    wd, first, second, cancelled = cluster
    ids = {**submitted(first), **submitted(second)}
    jobs = slurm_jobs()
    for i, rule in ids.items():
        assert jobs[i][0] == ("CANCELLED" if i == cancelled else "COMPLETED"), (i, rule, jobs[i])
    assert set(ids.values()) == MODEL_JOBS | {"calib", "inputs", "merge", "summary", "plots"}
    assert {int(p.stem) for p in wd.file(".snakemake/slurm_logs").rglob("*.log")} == set(ids)
    assert pd.read_csv(wd.file(paths.SUMMARY_CSV)).run.tolist() == ["fp", RUN]


@pytest.mark.slow
def test_cancelled_chunk_fails_the_first_run_alone(cluster):
    wd, first, second, cancelled = cluster
    assert first.proc.returncode != 0
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in first.text
    ran = set(submitted(first).values())
    assert "search_002" in ran and "merge" not in ran  # the other chunk, running alongside, finished


@pytest.mark.slow
def test_rerun_runs_only_the_cancelled_chunk_and_what_depends_on_it(cluster):
    wd, first, second, cancelled = cluster
    assert parse_job_stats(second.text) == {"search": 1, "merge": 1, "export": 1, "pack": 1, "eval": 1,
                                            "summary": 1, "plots": 1, "all": 1}
    assert wd.planned() == {}


@pytest.mark.slow
def test_scale_cache_matches_a_local_run(cluster, local):
    wd = cluster[0]
    assert wd.file(CACHE).read_bytes() == local.file(CACHE).read_bytes()
    scales = local.file(paths.RUN.format(model=MODEL, calib="demo", run=RUN)) / "scales"
    layers = sorted(scales.rglob("*.safetensors"))
    assert len(layers) == 4
    run_scales = wd.file(paths.RUN.format(model=MODEL, calib="demo", run=RUN)) / "scales"
    for layer in layers:
        assert (run_scales / layer.relative_to(scales)).read_bytes() == layer.read_bytes()


@pytest.mark.slow
def test_gpu_jobs_get_a_slurm_gpu(cluster, tmp_path):
    """With a GPU device the model jobs ask SLURM for one (the test node has one in name only)."""
    wd = tmp_path / "wd"
    shutil.copytree(cluster[0].path, wd)  # device cpu, with .snakemake: the device change reruns acts
    run = Detached(wd, tmp_path / "gpu.log", paths.ACTS.format(model=MODEL, calib="demo"), *SLURM_ARGS, "--config",
                   "device=auto")
    assert run.wait(120) == 0, run.text[-4000:]
    (job,) = submitted(run).items()
    assert job[1] == "acts" and slurm_jobs()[job[0]][0] == "COMPLETED"
    show = subprocess.run(["scontrol", "show", "job", str(job[0])], capture_output=True, text=True, check=True).stdout
    assert "TresPerJob=gres:gpu:1" in show
