"""Calibration set: sample (image, conversation) rows from a source, write one Parquet file.

Row formats:
  plain       one image with its conversation (user: image + prompt, assistant: caption)
  few_shot    two plain samples concatenated into one conversation
  interleave  sample A, a user turn of ~`interleave_tokens` words of pure text, sample B
  text        a plain sample's conversation without its image (prompt and caption/answer only): the text-only
              calibration that image-text calibration is compared with

Sampling is a function of (seed, sample ids) only, through sha256 (`draw`), so the same config
gives the same rows on every Python version, whatever the order of the source file's records.
"""
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmquant.data.images import check_image_size, decode_image
from vlmquant.data.readers import Sample, Turn, read_coco_captions, read_sharegpt, read_text_corpus
from vlmquant.data.screens import check_text
from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps, package_versions, sha256_bytes, sha256_file

FORMATS = {"plain": 1, "few_shot": 2, "interleave": 2, "text": 1}  # base samples per row
SOURCES = ("coco", "sharegpt")

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("image_ids", pa.list_(pa.string())),
    ("file_names", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("image_sha256", pa.list_(pa.string())),
    ("turns", pa.list_(pa.struct([("role", pa.string()), ("text", pa.string()), ("images", pa.list_(pa.int32()))]))),
])


def draw(seed, kind, key):
    """A uniform integer in [0, 2**256) determined by (seed, kind, key): sha256 of "seed/kind/key"
    (unambiguous: seed is an int, kind a fixed word), the same on every Python version and platform."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{kind}/{key}".encode()).digest(), "big")


def base_samples(cfg, seed, name="calib"):
    """The source's samples, in the source's order; each COCO image gets one of its captions, drawn by seed."""
    if cfg["source"] == "sharegpt":
        return read_sharegpt(cfg["captions"])
    prompt = cfg["prompt"]
    check_text(prompt, f"calib '{name}': prompt", empty_ok=True)
    samples = []
    for image_id, file_name, captions in read_coco_captions(cfg["captions"]):
        captions = sorted(captions)  # the draw does not depend on the file's order
        caption = captions[draw(seed, "caption", image_id) % len(captions)]
        turns = (Turn("user", prompt, (0,)), Turn("assistant", caption))
        samples.append(Sample(f"coco-{image_id}", (image_id,), (file_name,), turns))
    return samples


def join(samples, middle_text=None):
    """Concatenate samples into one row, renumbering image indices; optional pure-text user turn between.

    A conversation has one system turn, at its start: only the first sample's is kept.
    """
    turns, image_ids, file_names = [], [], []
    for k, s in enumerate(samples):
        if k and middle_text is not None:
            turns.append(Turn("user", middle_text))
        offset = len(image_ids)
        turns += [Turn(t.role, t.text, tuple(i + offset for i in t.images)) for t in s.turns
                  if not (k and t.role == "system")]
        image_ids += s.image_ids
        file_names += s.file_names
    return Sample("+".join(s.sample_id for s in samples), tuple(image_ids), tuple(file_names), tuple(turns))


def without_images(sample):
    """The sample with its images removed: the same turns and texts, no image ids, files or image slots."""
    return Sample(sample.sample_id, (), (), tuple(Turn(t.role, t.text) for t in sample.turns))


def text_span(paragraphs, n_words, start):
    """n_words consecutive words of the corpus, from paragraph `start` on, wrapping around."""
    words = []
    for p in paragraphs[start:] + paragraphs[:start]:
        words += p.split()
        if len(words) >= n_words:
            break
    return " ".join(words[:n_words])


def _int(cfg, key, name, minimum=None):
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or minimum is not None and value < minimum:
        bound = "" if minimum is None else f" >= {minimum}"
        raise VlmquantError(f"calib '{name}': {key} must be an integer{bound}, got {value!r}")
    return value


def sample_rows(cfg, name="calib"):
    """Deterministic rows for a calibration config (`n_samples`, `seed`, `format`, source fields).

    Base samples are ranked by draw(seed, "sample", sample_id); the first n_samples (pairs for
    few_shot/interleave, in rank order) are taken. Raises VlmquantError when the pool is too small.
    """
    if cfg.get("source") not in SOURCES:
        raise VlmquantError(f"calib '{name}': unknown source {cfg.get('source')!r}; choose one of {', '.join(SOURCES)}")
    fmt = cfg["format"]
    if fmt not in FORMATS:
        raise VlmquantError(f"calib '{name}': unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    n_samples = _int(cfg, "n_samples", name, minimum=1)
    seed = _int(cfg, "seed", name)
    pool = base_samples(cfg, seed, name)
    need = n_samples * FORMATS[fmt]
    if need > len(pool):
        raise VlmquantError(
            f"calib '{name}': n_samples {n_samples} in format {fmt} needs {need} samples, "
            f"but {cfg['captions']} has {len(pool)}")
    picked = sorted(pool, key=lambda s: draw(seed, "sample", s.sample_id))[:need]
    if fmt == "plain":
        return picked
    if fmt == "text":
        return [without_images(s) for s in picked]
    paragraphs = None
    if fmt == "interleave":
        if not cfg.get("text"):
            raise VlmquantError(f"calib '{name}': format interleave needs a 'text' corpus file")
        n_words = _int(cfg, "interleave_tokens", name, minimum=1)
        paragraphs = read_text_corpus(cfg["text"])
        total = sum(len(p.split()) for p in paragraphs)
        if total < n_words:
            raise VlmquantError(f"{cfg['text']}: {total} words of text, but interleave_tokens is {n_words}; "
                                f"use a larger corpus or fewer interleave_tokens")
    rows = []
    for i in range(n_samples):
        pair = picked[2 * i: 2 * i + 2]
        middle = None
        if paragraphs is not None:
            start = draw(seed, "text", "+".join(s.sample_id for s in pair)) % len(paragraphs)
            middle = text_span(paragraphs, n_words, start)
        rows.append(join(pair, middle))
    return rows


def read_image(path, where):
    """The file's bytes, after checking that it decodes (images.decode_image) to a size every
    supported processor takes (images.check_image_size). Errors name `where`."""
    path = Path(path)
    if not path.is_file():
        raise VlmquantError(f"{where}: image file not found")
    data = path.read_bytes()
    check_image_size(decode_image(data, where).size, where)
    return data


def build_calib(cfg, out_path, name="calib"):
    """Write the calibration Parquet for `cfg` to `out_path` atomically; nothing is written on error."""
    rows = sample_rows(cfg, name)
    images_dir = Path(cfg["images"])
    if not images_dir.is_dir():
        raise VlmquantError(f"calib '{name}': image folder {images_dir} not found (calib.{name}.images)")
    columns = {field.name: [] for field in SCHEMA}
    for s in rows:
        blobs = [read_image(images_dir / f, f"sample {s.sample_id}: {images_dir / f}") for f in s.file_names]
        columns["sample_id"].append(s.sample_id)
        columns["image_ids"].append(list(s.image_ids))
        columns["file_names"].append(list(s.file_names))
        columns["images"].append(blobs)
        columns["image_sha256"].append([sha256_bytes(b) for b in blobs])
        columns["turns"].append([{"role": t.role, "text": t.text, "images": list(t.images)} for t in s.turns])
    sources = {str(cfg["captions"]): sha256_file(cfg["captions"])}
    if cfg["format"] == "interleave":
        sources[str(cfg["text"])] = sha256_file(cfg["text"])
    meta = {"config": cfg, "name": name, "sources": sources, "packages": package_versions()}
    table = pa.table(columns, schema=SCHEMA.with_metadata({"vlmquant": dumps(meta)}))
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_calib(path):
    """Rows of a calibration Parquet as dicts (turns as lists of dicts)."""
    return pq.read_table(path).to_pylist()


def calib_metadata(path):
    return json.loads(pq.read_schema(path).metadata[b"vlmquant"])
