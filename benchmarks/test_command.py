"""Wall and CPU time of the README's test command (`python -m pytest -q`), with where each pytest-xdist worker spent
it: every test module's first start and last end on its worker, and when each worker finished (a worker that ends
early idles while the other runs on).

Run as a script it runs the test command in the checkout with this file as a pytest plugin (`-p test_command`,
loaded by every worker), which appends each test's start and end to a JSON-lines file; the JSON then holds the
per-worker ends and module spans (spans over 5 s), the counts pytest printed, and the CPU seconds of the run.

    python benchmarks/test_command.py --out benchmarks/results/test_command_cpu.json
"""
import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVENTS = "VLMQUANT_TEST_TIMELINE"  # the JSON-lines file the plugin appends to


# --- the plugin (in each pytest process) -------------------------------------------------------------
def _event(nodeid, kind):
    path = os.environ.get(EVENTS)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": nodeid,
                                "event": kind, "t": time.time()}) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _event(nodeid, "start")


def pytest_runtest_logfinish(nodeid, location):
    _event(nodeid, "end")


# --- the script ----------------------------------------------------------------------------------------
def workers(lines):
    """{worker: {"end": s, "modules": [[module, start s, end s], …]}} from the plugin's events, in seconds after the
    first test started; modules in the order they started, those spanning over 5 s."""
    events = [json.loads(line) for line in lines if line.strip()]
    t0 = min(e["t"] for e in events)
    started, out = {}, {}
    for e in events:
        key = e["worker"], e["test"]
        if e["event"] == "start":
            started[key] = e["t"] - t0
            continue
        w = out.setdefault(e["worker"], {"end": 0.0, "modules": {}})
        module, end = e["test"].split("::")[0], e["t"] - t0
        span = w["modules"].setdefault(module, [started.get(key, end), end])
        span[1] = max(span[1], end)
        w["end"] = max(w["end"], end)
    return {name: {"end": round(w["end"], 1),
                   "modules": [[m, round(a, 1), round(b, 1)] for m, (a, b) in
                               sorted(w["modules"].items(), key=lambda kv: kv[1][0]) if b - a > 5]}
            for name, w in sorted(out.items()) if name != "main"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    events = Path(args.out).resolve().with_suffix(".events.jsonl")
    events.unlink(missing_ok=True)
    env = dict(os.environ, **{EVENTS: str(events)},
               PYTHONPATH=os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "test_command", "-p", "no:cacheprovider", *args.pytest_args]
    t = time.perf_counter()
    res = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = [line for line in res.stdout.splitlines() if re.search(r"\d+ passed", line)]
    result = {"command": "python -m pytest -q", "returncode": res.returncode, "wall_seconds": round(wall, 1),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "summary": summary[-1] if summary else None,
              "workers": workers(events.read_text().splitlines()),
              "env": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                      "load_average_after": os.getloadavg()}}
    events.unlink()
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    sys.exit(res.returncode)


if __name__ == "__main__":
    main()
