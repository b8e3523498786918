"""Wall time of the offline demo pipeline from clean, and of a no-op rerun (issue 7, target 5).

Each run starts from an empty working directory holding only config.yaml (the repository's),
so the demo model, data, calibration sets and every stage are rebuilt. Per-job seconds come
from the rules' `benchmark:` files. Installs are not timed. Each run also records the CPU seconds
of Snakemake and all its jobs (user + system) and the 1-minute load average before and after:
on a shared machine the wall time follows the load, the CPU seconds much less.

    python benchmarks/demo_cpu.py --runs 3 --out benchmarks/results/demo_cpu.json
"""
import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import environment, write_json

REPO = Path(__file__).resolve().parents[1]


def snakemake(work, cores):
    """(wall seconds, CPU seconds of Snakemake and its jobs, 1-min load average before, after) of one run."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", str(cores), "-q"]
    load, before = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-5000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, load, os.getloadavg()[0]


def job_seconds(work):
    """{benchmark file relative to results/benchmarks: wall seconds of that job}."""
    root = work / "results/benchmarks"
    out = {}
    for path in sorted(root.rglob("*.tsv")):
        with open(path) as f:
            out[str(path.relative_to(root))] = float(next(csv.DictReader(f, delimiter="\t"))["s"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--work", default="/tmp/vlmquant-demo-bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    runs = []
    for _ in range(args.runs):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copy(REPO / "config.yaml", work / "config.yaml")
        runs.append(snakemake(work, args.cores))
    jobs = job_seconds(work)
    noop = [snakemake(work, args.cores) for _ in range(3)]
    write_json(args.out, {
        "settings": vars(args),
        "env": environment(),
        "seconds_from_clean": [r[0] for r in runs],
        "median_seconds_from_clean": statistics.median(r[0] for r in runs),
        "cpu_seconds_from_clean": [round(r[1], 1) for r in runs],
        "load_average_1min_before_after": [[round(r[2], 2), round(r[3], 2)] for r in runs],
        "noop_rerun_seconds": [r[0] for r in noop],
        "last_run_job_seconds": jobs,
        "last_run_job_seconds_sum": sum(jobs.values()),
    })


if __name__ == "__main__":
    main()
