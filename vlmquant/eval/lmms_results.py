"""Run lmms-eval as a subprocess and read the scores it writes (no lmms-eval import needed).

`python -m lmms_eval ... --output_path OUT` writes OUT/<model name>/<YYYYMMDD_HHMMSS>_results.json
with {"results": {task: {"alias": task, "<metric>,<filter>": value, "<metric>_stderr,<filter>": se}},
"n-samples": {task: {"effective": n}}, ...}, and with --log_samples (always passed: lmms_eval_command) one
OUT/<model name>/<YYYYMMDD_HHMMSS>_samples_<task>.jsonl per task, a line per question: {"doc_id": int,
"<metric>": per-question score (exact_match: 0.0 or 1.0), "target", "filtered_resps", ...}, one line per filter
(our tasks have the one filter "none"). lmms-eval 0.7.3 exits 0 even when the evaluation fails
(it logs the error and writes no results file), so a missing file is the sign of a failed run.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_dir

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
COLUMN_PREFIX = "lmms."  # summary columns: lmms.<task>.<metric> (+ .<filter> unless the filter is "none")


def results_file(out_dir):
    """The newest *_results.json under `out_dir` (names start with the run's timestamp)."""
    files = sorted(Path(out_dir).glob("*/*_results.json"), key=lambda p: p.name)
    if not files:
        raise VlmquantError(f"{out_dir}: no lmms-eval */*_results.json; the run failed (lmms-eval exits 0 "
                            "even then): see its log")
    return files[-1]


def read_metric(out_dir, task, metric="exact_match", filter_name="none"):
    """`metric` of `task` as lmms-eval reports it (exact_match: accuracy in [0, 1]), from the newest
    results file under `out_dir`. Raises VlmquantError naming the file and the missing key."""
    path = results_file(out_dir)
    results = json.loads(path.read_text()).get("results", {})
    if task not in results:
        raise VlmquantError(f"{path}: no results for task {task!r} (has {', '.join(sorted(results)) or 'none'})")
    key = f"{metric},{filter_name}"
    if key not in results[task]:
        raise VlmquantError(f"{path}: task {task!r} has no {key!r} (has {', '.join(sorted(results[task]))})")
    return float(results[task][key])


def read_scores(out_dir):
    """Every score of the newest results file under `out_dir`: {"lmms.<task>.<metric>[.<filter>]": float}.

    The metrics of a task are those its "higher_is_better" entry names (the task's metric_list); without
    one, every metric but standard errors (*_stderr, *_stderr_clt, …). Aliases and non-numeric values
    (e.g. "N/A") are left out.
    """
    path = results_file(out_dir)
    data = json.loads(path.read_text())
    out = {}
    for task, values in data.get("results", {}).items():
        metrics = data.get("higher_is_better", {}).get(task)
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            wanted = metric in metrics if isinstance(metrics, dict) else "_stderr" not in metric
            if not filter_name or not wanted or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or math.isnan(value):
                continue
            out[f"{COLUMN_PREFIX}{task}.{metric}" + ("" if filter_name == "none" else f".{filter_name}")] = float(value)
    return out


def samples_file(out_dir, task):
    """The per-question file of `task` written with the newest results file under `out_dir` (same timestamp)."""
    results = results_file(out_dir)
    path = results.with_name(results.name.removesuffix("_results.json") + f"_samples_{task}.jsonl")
    if not path.is_file():
        raise VlmquantError(f"{path}: not found; lmms-eval writes it with --log_samples: rerun the lmms_eval job")
    return path


def read_samples(out_dir, task):
    """The per-question records of `task` from samples_file: {doc_id: {"<metric>": score, "target": …, …}}.

    Raises VlmquantError naming the file when it is missing, a line has no doc_id, a doc_id repeats (a task with
    several filters writes a line per filter) or the count differs from the results file's n-samples."""
    path = samples_file(out_dir, task)
    samples = {}
    for k, line in enumerate(path.read_text().splitlines(), 1):
        sample = json.loads(line)
        if not isinstance(sample, dict) or "doc_id" not in sample:
            raise VlmquantError(f"{path}: line {k} has no doc_id; rerun the lmms_eval job")
        if sample["doc_id"] in samples:
            raise VlmquantError(f"{path}: doc_id {sample['doc_id']} twice (a task with several filters); "
                                "per-question scores need one filter")
        samples[sample["doc_id"]] = sample
    n = json.loads(results_file(out_dir).read_text()).get("n-samples", {}).get(task, {}).get("effective")
    if n is not None and n != len(samples):
        raise VlmquantError(f"{path}: {len(samples)} questions, its results file says {n}; rerun the lmms_eval job")
    return samples


def read_sample_scores(out_dir):
    """Per-question scores of the read_scores columns of filter "none" whose every question has a number (exact_match:
    0.0 or 1.0; not a task whose per-question values are records its aggregation reads, such as MME's):
    {"lmms.<task>.<metric>": {doc_id: float}}."""
    out, samples = {}, {}
    for column in read_scores(out_dir):
        task, metric = column.removeprefix(COLUMN_PREFIX).split(".")[:2]
        if column != f"{COLUMN_PREFIX}{task}.{metric}":  # another filter
            continue
        if task not in samples:
            samples[task] = read_samples(out_dir, task)
        values = {doc: s.get(metric) for doc, s in samples[task].items()}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            out[column] = {doc: float(v) for doc, v in values.items()}
    return out


def run_lmms_eval(cmd, out_dir, offline=False, log=None):
    """Run the lmms-eval command line `cmd` (a list; an empty first item means this interpreter) with
    `--output_path` a temporary folder, renamed to `out_dir` once a results file is there.

    offline: set OFFLINE_ENV (no Hugging Face hub or datasets downloads). Its output goes to `log`
    (an open file; default stderr). Raises VlmquantError when lmms-eval exits non-zero or writes no
    results file (lmms-eval 0.7.3 exits 0 on a failed evaluation); `out_dir` is then left untouched.
    """
    cmd = [cmd[0] or sys.executable, *cmd[1:]]
    log = log or sys.stderr
    env = {**os.environ, **(OFFLINE_ENV if offline else {})}
    with atomic_dir(out_dir) as tmp:
        full = [*cmd, "--output_path", str(tmp)]
        print("running:", subprocess.list2cmdline(full), file=log, flush=True)
        rc = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise VlmquantError(f"lmms-eval exited with status {rc} (command {cmd[:3]}…); see the log")
        try:
            path = results_file(tmp)
        except VlmquantError:
            raise VlmquantError(f"lmms-eval wrote no results file for {out_dir} (it exits 0 even when the "
                                "evaluation fails); see the log") from None
        print(f"results: {Path(out_dir) / path.relative_to(tmp)}", file=log, flush=True)
