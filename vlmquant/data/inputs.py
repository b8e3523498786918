"""Model inputs: a calibration Parquet run through a model's processor."""
import logging

from tqdm import tqdm

from vlmquant.data.calib import read_calib
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


def build_inputs(calib_path, model, out_path, name="model", labels="answer"):
    """Encode every row of `calib_path` with the processor of `model` (ModelRef); write a packed safetensors file.

    `labels`: "answer" or "turn", the tokens caption_mask and labels mark (Adapter.encode).

    Every row is screened for the tokenizer's special tokens before any is encoded; nothing is
    written when a row fails.
    """
    adapter, processor, config = model.adapter, model.processor(), model.config()
    rows = read_calib(calib_path)
    tokens = special_tokens(processor.tokenizer)
    for row in rows:
        check_row_text(row, processor.tokenizer, str(calib_path), tokens)
    samples = [encode_row(adapter, processor, config, row, str(calib_path), labels)
               for row in tqdm(rows, desc="encode", unit="sample")]
    meta = {"model": name, "family": adapter.family, "path": str(model.path),
            "calib_sha256": sha256_file(calib_path), "sample_ids": [r["sample_id"] for r in rows], "labels": labels,
            "packages": package_versions()}
    ragged.save(ragged.pack(samples), out_path, meta)
