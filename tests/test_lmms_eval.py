"""The lmms-eval task over a local Parquet file, our lmms-eval model, running lmms-eval and reading its results.

The end-to-end tests run `python -m lmms_eval` offline on the demo model and on the trained organism.
They need an interpreter with lmms-eval and vlmquant installed (vlmquant's `lmms_eval.models` entry
point registers the `vlmquant` model; pip install -e ".[lmms]"): this one, or the one named by
$VLMQUANT_LMMS_PYTHON; otherwise they skip.
"""
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import default_config
from vlmquant import paths
from vlmquant.errors import VlmquantError
from vlmquant.eval.lmms_results import read_metric, read_sample_scores, read_samples, read_scores, run_lmms_eval
from vlmquant.models import get_adapter
from vlmquant.organism import MODEL_DIR, score, task
from vlmquant.organism.lmms import TASK, TEMPLATE, exact_match, normalize_answer, write_task_yaml
from vlmquant.quant.scheme import Scheme
from vlmquant.quant.model import quantized_activations
from vlmquant.workflow import check_config, lmms_eval_command, summary_rows

REPO = Path(__file__).resolve().parents[1]
LMMS_PYTHON = os.environ.get("VLMQUANT_LMMS_PYTHON", sys.executable)
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "moon.png", "rocket.jpg")
QUESTIONS = ("What is in this picture?", "What colour is the object?")
MAX_NEW_TOKENS = 8  # the template's generation_kwargs
A4 = Scheme(w_bit=8, w_group=-1, symmetric=True, a_bit=4)  # activations per token at 4 bits (weights untouched)


def png(path):
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").resize((112, 112)).save(buf, format="PNG")
    return buf.getvalue()


def write_questions(path, images, answers):
    rows = [{"id": f"q{i}", "image": img, "question": QUESTIONS[i % 2], "answer": a, "kind": "test"}
            for i, (img, a) in enumerate(zip(images, answers))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_hooks():
    spec = importlib.util.spec_from_file_location("lmms_task_utils", TEMPLATE.parent / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- scoring, task file, hooks, results --------------------------------------------------------
@pytest.mark.parametrize("text, norm", [(" Top-Left.", "top left"), ("TWO", "two"), ("a\tb  c\n", "a b c"),
                                        ("red!", "red"), ("", "")])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_exact_match_ignores_case_punctuation_whitespace_only():
    assert exact_match("Three.", "three") == 1.0
    assert exact_match(" bottom  right", "Bottom-right") == 1.0
    assert exact_match("three", "two") == 0.0
    assert exact_match("topleft", "top left") == 0.0
    assert exact_match("red circle", "red") == 0.0


def test_write_task_yaml_points_at_the_parquet(tmp_path, demo_data):
    parquet = write_questions(tmp_path / "q.parquet", [png(demo_data / "images" / PHOTOS[0])], ["cat"])
    path = write_task_yaml(tmp_path / "q.parquet", tmp_path / "task")
    assert path == tmp_path / "task" / f"{TASK}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg == {"include": str(TEMPLATE), "task": TASK,
                   "dataset_kwargs": {"data_files": {"test": str(parquet.resolve())}}}
    assert TEMPLATE.is_file() and (TEMPLATE.parent / "utils.py").is_file()


def test_write_task_yaml_names_a_missing_column_or_file(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "answer": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(VlmquantError, match=r"bad.parquet: no column image, kind"):
        write_task_yaml(tmp_path / "bad.parquet", tmp_path / "task")
    with pytest.raises(VlmquantError, match="missing.parquet: file not found"):
        write_task_yaml(tmp_path / "missing.parquet", tmp_path / "task")
    assert not (tmp_path / "task").exists()


def test_task_hooks(demo_data):
    hooks = load_hooks()
    doc = {"image": png(demo_data / "images" / PHOTOS[1]), "question": "What is it?", "answer": "Cup"}
    (img,) = hooks.doc_to_visual(doc)
    assert img.mode == "RGB" and img.size == (112, 112)
    assert hooks.doc_to_text(doc) == "What is it?"
    assert hooks.doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": "\nShort answer."}) == \
        "Q: What is it?\nShort answer."
    assert hooks.process_results(doc, ["cup."]) == {"exact_match": 1.0}
    assert hooks.process_results(doc, ["a cup"]) == {"exact_match": 0.0}


def fake_results(folder, stamp, value):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"results": {TASK: {"alias": TASK, "exact_match,none": value, "exact_match_stderr,none": 0.1}},
            "n-samples": {TASK: {"original": 4, "effective": 4}}}
    (folder / f"{stamp}_results.json").write_text(json.dumps(data))


def test_read_metric_takes_the_newest_run(tmp_path):
    fake_results(tmp_path / "lmms__ckpt", "20261201_101500", 0.25)
    fake_results(tmp_path / "lmms__ckpt", "20261201_091500", 0.75)
    assert read_metric(tmp_path, TASK) == 0.25


def test_read_metric_errors_name_what_is_missing(tmp_path):
    with pytest.raises(VlmquantError, match="no lmms-eval .*the run failed"):
        read_metric(tmp_path, TASK)
    fake_results(tmp_path / "m", "20261201_101500", 0.5)
    with pytest.raises(VlmquantError, match=r"_results.json: no results for task 'mme' \(has vlmquant_vqa\)"):
        read_metric(tmp_path, "mme")
    with pytest.raises(VlmquantError, match=r"has no 'accuracy,none'"):
        read_metric(tmp_path, TASK, metric="accuracy")


def test_read_scores_keeps_the_tasks_numeric_scores(tmp_path):
    # as lmms-eval 0.7.3 writes them (plus a second filter, a non-numeric and a NaN score)
    scores = {"alias": TASK, "exact_match,none": 0.75, "exact_match_stderr,none": 0.1, "exact_match_stderr_clt,none": 0.1,
              "exact_match_stderr_clustered,none": "N/A", "exact_match,flexible": 1, "mme_score,none": math.nan}
    data = {"results": {TASK: scores, "other": dict(scores)}, "higher_is_better": {TASK: {"exact_match": True}}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "20261201_101500_results.json").write_text(json.dumps(data))
    both = {"exact_match": 0.75, "exact_match.flexible": 1.0}
    assert read_scores(tmp_path) == {f"lmms.{task}.{k}": v for task in (TASK, "other") for k, v in both.items()}


def fake_samples(folder, stamp, scores, task=TASK):
    """A samples file as lmms-eval 0.7.3 writes it with --log_samples (fields trimmed)."""
    records = [{"target": "red", "filtered_resps": "red", "exact_match": v} | ({} if i is None else {"doc_id": i})
               for i, v in scores]
    lines = [json.dumps(r) for r in records]
    (folder / f"{stamp}_samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines))


def test_read_samples_of_the_newest_run(tmp_path):
    folder = tmp_path / "lmms__ckpt"
    fake_results(folder, "20261201_091500", 0.75)
    fake_samples(folder, "20261201_091500", [(0, 1.0), (1, 1.0), (2, 0.0), (3, 1.0)])
    samples = read_samples(tmp_path, TASK)
    assert {doc: s["exact_match"] for doc, s in samples.items()} == {0: 1.0, 1: 1.0, 2: 0.0, 3: 1.0}
    assert read_sample_scores(tmp_path) == {f"lmms.{TASK}.exact_match": {0: 1.0, 1: 1.0, 2: 0.0, 3: 1.0}}
    fake_results(folder, "20261201_101500", 0.25)  # a newer run without its samples file
    with pytest.raises(VlmquantError, match=r"20261201_101500_samples_vlmquant_vqa.jsonl: not found; .*--log_samples"):
        read_samples(tmp_path, TASK)


def test_read_sample_scores_keeps_numbers_only(tmp_path):
    """A score whose per-question values are records for the task's aggregation (MME's) gets no per-question
    scores; the numeric one of the same task does."""
    data = {"results": {TASK: {"exact_match,none": 0.5, "mme_score,none": 80.0}}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "20261201_101500_results.json").write_text(json.dumps(data))
    lines = [{"doc_id": i, "exact_match": float(i), "mme_score": {"question_id": i, "score": 1}} for i in (0, 1)]
    (tmp_path / "m" / f"20261201_101500_samples_{TASK}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_sample_scores(tmp_path) == {f"lmms.{TASK}.exact_match": {0: 0.0, 1: 1.0}}


@pytest.mark.parametrize("scores, error", [([(0, 1.0), (1, 0.0), (2, 1.0)], r"3 questions, its results file says 4"),
                                           ([(0, 1.0), (0, 0.0), (1, 1.0), (2, 1.0)], r"doc_id 0 twice"),
                                           ([(0, 1.0), (None, 1.0), (2, 1.0), (3, 1.0)], r"line 2 has no doc_id")])
def test_read_samples_refuses_a_mismatched_file(tmp_path, scores, error):
    fake_results(tmp_path / "m", "20261201_101500", 0.5)
    fake_samples(tmp_path / "m", "20261201_101500", scores)
    with pytest.raises(VlmquantError, match=r"_samples_vlmquant_vqa.jsonl: " + error):
        read_samples(tmp_path, TASK)


def test_lmms_eval_command_and_summary_rows():
    cfg = default_config()
    cfg["lmms_eval"] = {"enabled": True, "tasks": ["vlmquant_vqa", "mme"], "include_path": "tasks", "limit": 8,
                        "extra_args": ["--verbosity", "DEBUG"]}
    cfg = check_config(cfg, REPO / "workflow/schemas/config.schema.yaml")
    assert lmms_eval_command(cfg["lmms_eval"], paths.CHECKPOINT.format(model="m", calib="c", run="r")) == [
        "", "-m", "lmms_eval", "--model", "vlmquant", "--model_args", "pretrained=results/m/c/r/checkpoint",
        "--tasks", "vlmquant_vqa,mme", "--batch_size", "1", "--include_path", "tasks", "--limit", "8", "--log_samples",
        "--verbosity", "DEBUG"]
    rows = summary_rows(cfg)
    assert [r["lmms"] for r in rows] == [paths.LMMS_FP.format(model="demo-qwen2vl")] + [
        paths.LMMS.format(model="demo-qwen2vl", calib="demo", run=r) for r in cfg["targets"]["runs"]]
    cfg["lmms_eval"]["include_fp"] = False
    rtn = paths.LMMS.format(model="demo-qwen2vl", calib="demo", run="rtn-w3g128")
    assert [r["lmms"] for r in summary_rows(cfg)][:2] == [None, rtn]


STAND_IN = """import json, pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--output_path") + 1])
print("stand-in lmms-eval", sys.argv[1:-2])
if sys.argv[1] == "ok":
    (out / "model").mkdir(parents=True)
    (out / "model" / "20261201_101500_results.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}}))
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("mode, rc, error", [("ok", 0, None), ("none", 0, "wrote no results file"),
                                             ("ok", 3, "exited with status 3")])
def test_run_lmms_eval_needs_a_results_file(mode, rc, error, tmp_path):
    """lmms-eval exits 0 when the evaluation fails: only a results file counts as success."""
    out, log = tmp_path / "results" / "lmms_eval", tmp_path / "log"
    with open(log, "w") as f:
        if error is None:
            run_lmms_eval(["", "-c", STAND_IN, mode, str(rc)], out, offline=True, log=f)
        else:
            with pytest.raises(VlmquantError, match=error):
                run_lmms_eval(["", "-c", STAND_IN, mode, str(rc)], out, offline=True, log=f)
    assert "stand-in lmms-eval ['" + mode in log.read_text()
    assert os.listdir(tmp_path / "results") == ([] if error else ["lmms_eval"])  # no temporary folder left
    if error is None:
        assert read_scores(out) == {"lmms.t.acc": 0.5}


# --- end to end through python -m lmms_eval ----------------------------------------------------
@pytest.fixture(scope="module")
def lmms_python():
    """The interpreter that runs lmms-eval; skips the test where it has no lmms-eval."""
    code = ("import importlib.util, sys; from importlib.metadata import entry_points; "
            "sys.exit(2 if importlib.util.find_spec('lmms_eval') is None else "
            "0 if 'vlmquant' in entry_points(group='lmms_eval.models').names else 1)")
    rc = subprocess.run([LMMS_PYTHON, "-c", code], env=lmms_env()).returncode
    if rc == 2:
        pytest.skip(f"lmms-eval is not installed for {LMMS_PYTHON} (set VLMQUANT_LMMS_PYTHON)")
    assert rc == 0, (f"{LMMS_PYTHON} has lmms-eval but not vlmquant's lmms_eval.models entry point: "
                     "reinstall vlmquant there (pip install -e .)")
    return LMMS_PYTHON


def lmms_env(hf_home=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    if hf_home:
        env["HF_HOME"] = str(hf_home)  # datasets' Arrow cache of the Parquet file
    return env


@pytest.fixture(scope="module")
def predictions(demo_model_path, demo_data):
    """Greedy answers of the demo model to the test questions: {a_bit: [str]} for fp (None) and A4
    (activations quantized at run time as quantization.json's scheme A4 says)."""
    adapter = get_adapter("qwen2_vl")
    model, processor = adapter.load_model(demo_model_path), adapter.load_processor(demo_model_path)
    tok = processor.tokenizer
    images = [png(demo_data / "images" / p) for p in PHOTOS]
    out = {}
    for a_bit in (None, 4):
        out[a_bit] = []
        for i, data in enumerate(images):
            content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 2]}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
            enc = processor(text=[text], images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
            with torch.no_grad(), quantized_activations(model, adapter, A4 if a_bit else None):
                ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out[a_bit].append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return images, out


@pytest.mark.slow  # about 50 s here: lmms-eval in a subprocess
@pytest.mark.parametrize("a_bit", [None, 4])
def test_lmms_eval_scores_the_checkpoint(a_bit, lmms_python, predictions, demo_model_path, tmp_path):
    """Even questions are answered with the checkpoint's own greedy output (case and punctuation
    changed), odd ones with the other setting's output where it differs: accuracy is exactly 1/2,
    and only if the run quantizes activations exactly when quantization.json has a_bit."""
    images, preds = predictions
    mine, other = preds[a_bit], preds[4 if a_bit is None else None]
    changed = [i for i in range(1, len(images), 2) if normalize_answer(mine[i]) != normalize_answer(other[i])]
    assert changed, "A4 did not change any odd answer of the demo model; pick other photos"
    answers = [mine[i].upper() + "." if i % 2 == 0 else other[i] if i in changed else "no such answer"
               for i in range(len(images))]
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(demo_model_path, checkpoint)
    if a_bit is not None:
        (checkpoint / "quantization.json").write_text(json.dumps({"scheme": asdict(A4), "ignored_modules": []}))
    write_task_yaml(write_questions(tmp_path / "q.parquet", images, answers), tmp_path / "task")
    out = tmp_path / "lmms_eval"
    cmd = [lmms_python, "-m", "lmms_eval", "--model", "vlmquant", "--model_args", f"pretrained={checkpoint},device=cpu",
           "--include_path", str(tmp_path / "task"), "--tasks", TASK, "--batch_size", "3", "--log_samples",
           "--output_path", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=lmms_env(tmp_path / "hf"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    try:
        accuracy = read_metric(out, TASK)
    except VlmquantError:
        raise AssertionError(res.stdout[-3000:] + res.stderr[-3000:]) from None
    assert accuracy == 0.5
    assert read_sample_scores(out) == {f"lmms.{TASK}.exact_match": {i: float(i % 2 == 0) for i in range(len(images))}}


@pytest.mark.slow  # about 70 s here
def test_lmms_eval_scores_the_organism(lmms_python, tmp_path, monkeypatch):
    """The organism's task through lmms-eval, offline on CPU: the trained model scores its recorded accuracy
    on the first held-out questions (the task as the organism_data rule writes it)."""
    recorded = json.loads((MODEL_DIR / "training.json").read_text())["heldout_accuracy_first200"]
    data = task.write_organism_data(tmp_path / "data", n_calib=1, n_heldout=recorded["n"])
    write_task_yaml(data / "heldout.parquet", tmp_path / "task")
    for key, value in lmms_env(tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lmms_eval"
    cmd = [lmms_python, "-m", "lmms_eval", "--model", "vlmquant", "--model_args", f"pretrained={MODEL_DIR},device=cpu",
           "--include_path", str(tmp_path / "task"), "--tasks", TASK, "--batch_size", "50"]
    with open(tmp_path / "log", "w") as log:
        run_lmms_eval(cmd, out, offline=True, log=log)
    measured = read_metric(out, TASK)
    assert measured == pytest.approx(recorded["overall"], abs=0.02)
    assert measured > score.blind_baseline(score.task_rows(data / "heldout.parquet"), n_train=5000)["overall"] + 0.5
