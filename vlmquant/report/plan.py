"""What a Snakemake run is about to do, per stage, with estimates; and the summary table once it is done.

Printed by the workflow's onstart/onsuccess hooks (Snakefile) on stderr, so they show in quiet mode too.
Both figures are estimates:
  time    the wall seconds this very job took when it last ran here (its benchmark file), else the median of the
          same stage's benchmark files of the same model here; none before a stage's first run in this folder
  memory  the host memory the job asks the scheduler for (resources mem_mb): the config's `*.mem_mb`, else
          workflow.job_mem_mb's estimate from the model's parameter count and dtype
"""
import csv
import glob
import math
import statistics
from dataclasses import dataclass

from vlmquant import paths


@dataclass(frozen=True)
class PlannedJob:
    rule: str
    wildcards: dict
    mem_mb: int | None = None  # resources mem_mb; None where the rule asks for none
    benchmark: str | None = None  # the job's benchmark file (paths.BENCHMARKS); None for rules without one


def planned_jobs(workflow):
    """PlannedJob of every job with outputs that a Snakemake workflow's DAG will run (in an onstart hook), in the
    order the rules are defined (the stage order)."""
    order = {rule.name: i for i, rule in enumerate(workflow.rules)}
    jobs = sorted((j for j in workflow.dag.needrun_jobs() if j.output), key=lambda j: order.get(j.rule.name, 0))
    return [PlannedJob(j.rule.name, dict(j.wildcards_dict), known_mb(j.resources.get("mem_mb")),
                       str(j.benchmark) if j.benchmark else None) for j in jobs]


def known_mb(value):
    """A job's mem_mb when known before it runs; None otherwise (none asked, or a cluster executor's
    "<TBD>" string: resources evaluated when the job is submitted)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bench_seconds(path):
    """The `s` column of one Snakemake benchmark file, or None when it is missing or unreadable."""
    try:
        with open(path, newline="") as f:
            return float(list(csv.DictReader(f, delimiter="\t"))[-1]["s"])
    except (OSError, KeyError, IndexError, ValueError, TypeError):
        return None


def estimate_seconds(job):
    """Estimated wall seconds of a job (module docstring), or None."""
    if job.benchmark is None:
        return None
    own = bench_seconds(job.benchmark)
    if own is not None:
        return own
    template = paths.BENCHMARKS.get(job.rule)
    if template is None or "model" not in job.wildcards:
        return None
    pattern = template.format(**{**{w: "*" for w in ("calib", "run", "chunk", "eval_calib")},
                                 "model": job.wildcards["model"]})
    found = [s for s in (bench_seconds(p) for p in glob.glob(pattern)) if s is not None]
    return statistics.median(found) if found else None


def plan_lines(jobs):
    """One line per stage (rule, in the order the stages first appear): job count, estimated seconds (sum over its
    jobs that have an estimate; none for rules without a benchmark file) and the largest host-memory estimate of
    one job."""
    by_rule = {}
    for job in jobs:
        by_rule.setdefault(job.rule, []).append(job)
    lines = [f"vlmquant: {len(jobs)} jobs to run (estimates: time from earlier runs in this folder, "
             "memory from the model's size)"]
    for rule, group in by_rule.items():
        times = [estimate_seconds(j) for j in group]
        known = [t for t in times if t is not None]
        if all(j.benchmark is None for j in group):
            time = ""  # a short step Snakemake does not time (calib, inputs, merge, summary, plots)
        elif known:
            time = f"~{sum(known):.0f} s in all" + (f" (for {len(known)} of them)" if len(known) < len(times) else "")
        else:
            time = "time unknown (first run here)"
        mems = [j.mem_mb for j in group if j.mem_mb is not None]
        mem = f"up to {math.ceil(max(mems) / 1024 * 10) / 10:g} GiB each" if mems else ""
        notes = ", ".join(n for n in (time, mem) if n)
        lines.append(f"  {rule:<14} {len(group):>3} job{'s' if len(group) > 1 else ' '}  {notes}".rstrip())
    return lines


FINAL_COLUMNS = {"model": "model", "run": "run", "scheme": "scheme", "caption_nll": "NLL",
                 "delta_nll_fp": "ΔNLL fp", "kl": "KL", "top1_agreement": "top-1", "time_total_s": "time s"}


def final_table(summary_csv):
    """The summary's main columns as text (for the terminal), or None when the summary is missing."""
    import pandas as pd  # only after a run: loading the workflow stays light

    try:
        df = pd.read_csv(summary_csv)
    except (OSError, pd.errors.EmptyDataError):
        return None
    cols = [c for c in FINAL_COLUMNS if c in df.columns]
    return df[cols].rename(columns=FINAL_COLUMNS).to_string(index=False, float_format=lambda v: f"{v:.4g}",
                                                             na_rep="")
