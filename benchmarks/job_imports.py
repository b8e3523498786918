"""CPU seconds a Snakemake job spends importing before it does any work (issue 30).

Each script under scripts/ runs in a fresh Python process. This starts `python -c` with the script's own
import lines (plus Snakemake's script preamble imports) and records the process's user + system CPU seconds,
the least of --repeats runs; then the same for the libraries alone, for reference. CPU seconds, not wall: on a
shared machine they follow the load much less.

    python benchmarks/job_imports.py --out benchmarks/results/job_imports_cpu.json
"""
import argparse
import ast
import resource
import subprocess
import sys
from pathlib import Path

from common import environment, write_json

REPO = Path(__file__).resolve().parents[1]
PREAMBLE = "import pickle; from snakemake.logging import logger; from snakemake.iocontainers import Snakemake"
LIBRARIES = ("pass", "import torch", "import transformers", "import transformers.modeling_utils",
             "import transformers.processing_utils", "import pandas", "import matplotlib.pyplot")


def import_lines(script):
    tree = ast.parse(script.read_text())
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def cpu_seconds(code, repeats):
    """Least user + system CPU seconds of `python -c code` over `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return round(best, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    scripts = {p.stem: "; ".join([PREAMBLE, *import_lines(p)]) for p in sorted((REPO / "scripts").glob("*.py"))}
    write_json(args.out, {
        "settings": vars(args),
        "env": environment(),
        "script_import_cpu_seconds": {name: cpu_seconds(code, args.repeats) for name, code in scripts.items()},
        "library_import_cpu_seconds": {code: cpu_seconds(code, args.repeats) for code in LIBRARIES},
    })


if __name__ == "__main__":
    main()
