"""Model inputs: a calibration Parquet run through a model's processor, on one or several CPU processes."""
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
from tqdm import tqdm

from vlmquant.data.calib import read_calib
from vlmquant.data import workers as sizing
from vlmquant.data.screens import check_text_for_special_tokens, special_tokens
from vlmquant.errors import VlmquantError
from vlmquant.io import ragged
from vlmquant.io.provenance import package_versions, sha256_file

log = logging.getLogger(__name__)


def check_row_text(row, tokenizer, where, tokens=None):
    """Refuse a row whose turn texts contain a special token of the model's tokenizer (see
    screens.check_text_for_special_tokens); `where` names the calibration file."""
    tokens = special_tokens(tokenizer) if tokens is None else tokens
    for k, turn in enumerate(row["turns"]):
        check_text_for_special_tokens(turn["text"], tokenizer, f"{where}: sample {row['sample_id']}, "
                                                               f"turn {k} ({turn['role']})", tokens)


def encode_row(adapter, processor, config, row, where, labels="answer"):
    """adapter.encode, with any failure (the processor refusing an image or text) turned into one
    line naming the sample and its image files; the traceback goes to the log."""
    try:
        return adapter.encode(processor, config, row, labels)
    except VlmquantError:
        raise
    except Exception as e:
        log.error("encoding sample %s failed", row["sample_id"], exc_info=True)
        message = str(e).strip()
        first = message.splitlines()[0] if message else ""
        raise VlmquantError(f"{where}: sample {row['sample_id']} ({', '.join(row['file_names'])}) could not be "
                            f"encoded for {adapter.family} ({type(e).__name__}: {first}); traceback in the log") from e


_worker = {}  # a forked encode worker's adapter, processor, config, where and labels (start_worker)


def start_worker(adapter, processor, config, where, labels):
    """Runs once in each forked worker: one torch thread, no tokenizers thread pool (its threads do not
    survive a fork), and the encode arguments, which fork hands over without pickling."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    _worker.update(adapter=adapter, processor=processor, config=config, where=where, labels=labels)


def encode_in_worker(row):
    w = _worker
    return dict(encode_row(w["adapter"], w["processor"], w["config"], row, w["where"], w["labels"]))


def encode_rows(adapter, processor, config, rows, where, labels="answer", workers=1):
    """encode_row over `rows`: the samples ({key: tensor}) in the rows' order.

    `workers` > 1: that many forked processes (not threads: templates and processors run partly in
    Python, under the GIL), each sent chunks of rows in turn; the samples are the same tensors as with
    one. A tensor comes back through torch's shared memory (an open file, until it is copied here on
    arrival). A failing row raises encode_row's VlmquantError here, the first in the rows' order as with
    one process; its traceback goes to the log from the worker.
    """
    if workers <= 1:
        return [encode_row(adapter, processor, config, row, where, labels)
                for row in tqdm(rows, desc="encode", unit="sample")]
    chunk = max(1, min(sizing.ROWS_PER_WORKER, len(rows) // (4 * workers)))  # small chunks even out uneven rows
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), start_worker,
                               (adapter, processor, config, where, labels))
    try:
        encoded = pool.map(encode_in_worker, rows, chunksize=chunk)  # forks here, before any thread of the pool's
        return [{k: v.clone() for k, v in sample.items()}
                for sample in tqdm(encoded, total=len(rows), desc="encode", unit="sample")]
    finally:
        pool.shutdown(cancel_futures=True)


def build_inputs(calib_path, model, out_path, name="model", labels="answer", workers=1):
    """Encode every row of `calib_path` with the processor of `model` (ModelRef); write a packed safetensors file.

    `labels`: "answer" or "turn", the tokens caption_mask and labels mark (Adapter.encode).
    `workers`: the CPUs the job may use; encode_rows gets workers.encode_workers(rows, workers) processes. The
    file is the same bytes for any number.

    Every row is screened for the tokenizer's special tokens before any is encoded; nothing is
    written when a row fails.
    """
    adapter, processor, config = model.adapter, model.processor(), model.config()
    rows = read_calib(calib_path)
    tokens = special_tokens(processor.tokenizer)
    for row in rows:
        check_row_text(row, processor.tokenizer, str(calib_path), tokens)
    samples = encode_rows(adapter, processor, config, rows, str(calib_path), labels,
                          sizing.encode_workers(len(rows), workers))
    meta = {"model": name, "family": adapter.family, "path": str(model.path),
            "calib_sha256": sha256_file(calib_path), "sample_ids": [r["sample_id"] for r in rows], "labels": labels,
            "packages": package_versions()}
    ragged.save(ragged.pack(samples), out_path, meta)
