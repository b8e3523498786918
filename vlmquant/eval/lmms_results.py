"""Read a task score from an lmms-eval output folder (no lmms-eval import needed).

`python -m lmms_eval ... --output_path OUT` writes OUT/<model name>/<YYYYMMDD_HHMMSS>_results.json
with {"results": {task: {"<metric>,<filter>": value, ...}}, "n-samples": {task: {"effective": n}}, ...}.
lmms-eval exits 0 even when the evaluation fails (it logs the error and writes no results file),
so a missing file here is the sign of a failed run.
"""
import json
from pathlib import Path

from vlmquant.errors import VlmquantError


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
    data = json.loads(path.read_text())
    results = data.get("results", {})
    if task not in results:
        raise VlmquantError(f"{path}: no results for task {task!r} (has {', '.join(sorted(results)) or 'none'})")
    key = f"{metric},{filter_name}"
    if key not in results[task]:
        raise VlmquantError(f"{path}: task {task!r} has no {key!r} (has {', '.join(sorted(results[task]))})")
    return float(results[task][key])
