"""Exact-match accuracy of a model folder on the organism task (greedy decoding), and the blind
baseline: the most frequent training answer of each question text, without looking at the image."""
import io
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import runtime_activations
from vlmquant.models import get_adapter
from vlmquant.organism import task
from vlmquant.organism.model import FAMILY, load_organism
from vlmquant.quant.model import quantized_activations

HELDOUT_SIZE = 1000
MAX_NEW_TOKENS = 5  # the longest answer ("bottom right") is 2 tokens, then <|im_end|>


def normalize(text):
    return text.strip().lower().rstrip(".").strip()


def task_rows(parquet_or_split="heldout", n=None, seed=0, photo_dir=None):
    """Rows {id, image (PIL RGB), question, answer, kind} of a heldout.parquet file or of a split
    generated in memory (its first `n` instances, HELDOUT_SIZE by default; train gives 5 per scene)."""
    if parquet_or_split in task.SPLITS:
        pairs = task.instances(parquet_or_split, HELDOUT_SIZE if n is None else n, seed)
        return [dict(id=f"{parquet_or_split}-{s.index:06d}-{q.kind}", image=task.render(s, photo_dir),
                     question=q.question, answer=q.answer, kind=q.kind) for s, q in pairs]
    if not str(parquet_or_split).endswith(".parquet"):
        raise VlmquantError(f"organism score: {parquet_or_split!r} is neither a .parquet file nor a split "
                            f"({', '.join(task.SPLITS)})")
    rows = task.read_heldout(parquet_or_split)[:n]
    for r in rows:
        r["image"] = Image.open(io.BytesIO(r["image"])).convert("RGB")
    return rows


def prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def predict(model, processor, images, questions, batch_size=64):
    """Greedy answers (str) to `questions` about `images` (PIL), batched with left padding."""
    device = next(model.parameters()).device
    tok = processor.tokenizer
    out = []
    for start in range(0, len(questions), batch_size):
        texts = [prompt(processor, q) for q in questions[start:start + batch_size]]
        enc = processor(text=texts, images=images[start:start + batch_size], padding=True,
                        padding_side="left", return_tensors="pt").to(device)
        ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def score(predictions, rows):
    """{"overall", "per_kind": {kind: accuracy}, "n"} of exact matches (after normalize)."""
    if len(predictions) != len(rows) or not rows:
        raise VlmquantError(f"organism score: {len(predictions)} predictions for {len(rows)} rows")
    hits = defaultdict(list)
    for p, r in zip(predictions, rows):
        hits[r["kind"]].append(normalize(p) == normalize(r["answer"]))
    every = [h for kind in hits.values() for h in kind]
    return {"overall": sum(every) / len(every), "n": len(every),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}}


def evaluate(model, processor, rows, batch_size=64):
    return score(predict(model, processor, [r["image"] for r in rows], [r["question"] for r in rows],
                         batch_size), rows)


def accuracy(model_dir, parquet_or_split="heldout", device="cpu", limit=None, seed=0, batch_size=64):
    """Exact-match accuracy of a model folder (the organism or a checkpoint of it) on a heldout.parquet
    or a task split. A weight-activation checkpoint (quantization.json scheme with a_bit) answers with
    its decoder-linear inputs fake-quantized, as vlmquant's eval and lmms-eval model run it.

    `limit` keeps the first rows only. Returns {"overall", "per_kind", "n"} (fractions in [0, 1]).
    Raises VlmquantError for a missing folder or file.
    """
    if not Path(model_dir).is_dir():
        raise VlmquantError(f"{model_dir}: model folder not found")
    model, processor = load_organism(model_dir, device)
    scheme, ignored, input_scales = runtime_activations(model_dir)
    rows = task_rows(parquet_or_split, limit, seed)
    with quantized_activations(model, get_adapter(FAMILY), scheme, ignored, input_scales):
        return evaluate(model, processor, rows, batch_size)


def blind_baseline(rows, n_train=20000, seed=0):
    """Accuracy of answering each question with its most frequent answer among the questions of
    the first `n_train` training scenes (falling back to the kind's most frequent answer)."""
    by_question, by_kind = defaultdict(Counter), defaultdict(Counter)
    for i in range(n_train):
        for q in task.layout("train", i, seed).questions:
            by_question[q.question][q.answer] += 1
            by_kind[q.kind][q.answer] += 1
    guesses = [(by_question.get(r["question"]) or by_kind[r["kind"]]).most_common(1)[0][0] for r in rows]
    return score(guesses, rows)
