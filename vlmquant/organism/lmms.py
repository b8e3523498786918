"""The organism's held-out questions as an lmms-eval task, and its exact-match scoring.

The task's settings live in `lmms_task/_default_template_yaml` (generation, metric) and its hooks
in `lmms_task/utils.py`; `write_task_yaml` adds the one thing that changes per run, the Parquet
file (columns id, image as PNG bytes, question, answer, kind), so lmms-eval reads it with the
`datasets` parquet builder and never contacts the Hugging Face hub.
"""
import re
import string
from pathlib import Path

import yaml

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path

TASK = "vlmquant_vqa"
TEMPLATE = Path(__file__).parent / "lmms_task" / "_default_template_yaml"
COLUMNS = ("id", "image", "question", "answer", "kind")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text):
    """Lower case, punctuation replaced by spaces, whitespace collapsed: ' Top-Left.' -> 'top left'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction, answer):
    """1.0 when the normalized prediction equals the normalized answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def write_task_yaml(parquet, out_dir, task=TASK):
    """Write `out_dir/<task>.yaml`: the template task over the Parquet file `parquet`.

    Run it with `python -m lmms_eval --include_path <out_dir> --tasks <task> ...` (lmms-eval 0.7.3
    does not accept the yaml's path as --tasks). Both paths are written absolute, so the file works
    from any working directory. Raises VlmquantError if `parquet` lacks a column of COLUMNS. Returns the path.
    """
    import pyarrow.parquet as pq

    parquet = Path(parquet).resolve()
    if not parquet.is_file():
        raise VlmquantError(f"{parquet}: file not found (the held-out questions of the lmms-eval task)")
    missing = [c for c in COLUMNS if c not in pq.read_schema(parquet).names]
    if missing:
        raise VlmquantError(f"{parquet}: no column {', '.join(missing)}; the task needs {', '.join(COLUMNS)}")
    config = {"include": str(TEMPLATE), "task": task, "dataset_kwargs": {"data_files": {"test": str(parquet)}}}
    path = Path(out_dir) / f"{task}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
