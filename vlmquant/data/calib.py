"""Calibration set: sample (image, conversation) rows from a source, write one Parquet file.

Row formats:
  plain       one image with its conversation (user: image + prompt, assistant: caption)
  few_shot    two plain samples concatenated into one conversation
  interleave  sample A, a user turn of ~`interleave_tokens` words of pure text, sample B
"""
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlmquant.data.readers import Sample, Turn, read_coco_captions, read_sharegpt, read_text_corpus
from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path
from vlmquant.io.provenance import dumps, package_versions, sha256_bytes, sha256_file

FORMATS = {"plain": 1, "few_shot": 2, "interleave": 2}  # base samples per row

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("image_ids", pa.list_(pa.string())),
    ("file_names", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("image_sha256", pa.list_(pa.string())),
    ("turns", pa.list_(pa.struct([("role", pa.string()), ("text", pa.string()), ("images", pa.list_(pa.int32()))]))),
])


def base_samples(cfg, rng):
    """The source's samples, each a single-image conversation, in a fixed order."""
    if cfg["source"] == "coco":
        prompt = cfg["prompt"]
        return [
            Sample(f"coco-{image_id}", (image_id,), (file_name,),
                   (Turn("user", prompt, (0,)), Turn("assistant", rng.choice(captions))))
            for image_id, file_name, captions in read_coco_captions(cfg["captions"], prompt)
        ]
    return read_sharegpt(cfg["captions"])


def join(samples, middle_text=None):
    """Concatenate samples into one row, renumbering image indices; optional pure-text user turn between."""
    turns, image_ids, file_names = [], [], []
    for k, s in enumerate(samples):
        if k and middle_text is not None:
            turns.append(Turn("user", middle_text))
        offset = len(image_ids)
        turns += [Turn(t.role, t.text, tuple(i + offset for i in t.images)) for t in s.turns]
        image_ids += s.image_ids
        file_names += s.file_names
    return Sample("+".join(s.sample_id for s in samples), tuple(image_ids), tuple(file_names), tuple(turns))


def text_span(paragraphs, n_words, rng):
    """~n_words consecutive words of the corpus, starting at a random paragraph."""
    start = rng.randrange(len(paragraphs))
    words = []
    for p in paragraphs[start:] + paragraphs[:start]:
        words += p.split()
        if len(words) >= n_words:
            break
    return " ".join(words[:n_words])


def sample_rows(cfg, name="calib"):
    """Deterministic rows for a calibration config (`n_samples`, `seed`, `format`, source fields)."""
    fmt = cfg["format"]
    if fmt not in FORMATS:
        raise VlmquantError(f"calib '{name}': unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rng = random.Random(cfg["seed"])
    pool = base_samples(cfg, rng)
    need = cfg["n_samples"] * FORMATS[fmt]
    if need > len(pool):
        raise VlmquantError(
            f"calib '{name}': n_samples {cfg['n_samples']} in format {fmt} needs {need} samples, "
            f"but {cfg['captions']} has {len(pool)}")
    picked = rng.sample(pool, need)
    if fmt == "plain":
        return picked
    middle = None
    if fmt == "interleave":
        if not cfg.get("text"):
            raise VlmquantError(f"calib '{name}': format interleave needs a 'text' corpus file")
        paragraphs = read_text_corpus(cfg["text"])
        if not paragraphs:
            raise VlmquantError(f"{cfg['text']}: no text")
    rows = []
    for i in range(cfg["n_samples"]):
        if fmt == "interleave":
            middle = text_span(paragraphs, cfg["interleave_tokens"], rng)
        rows.append(join(picked[2 * i: 2 * i + 2], middle))
    return rows


def read_image(path):
    """The file's bytes, after checking it decodes as an image."""
    path = Path(path)
    if not path.is_file():
        raise VlmquantError(f"{path}: image file not found")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as e:  # PIL raises many types for bad files
        raise VlmquantError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return data


def build_calib(cfg, out_path, name="calib"):
    """Write the calibration Parquet for `cfg` to `out_path` atomically."""
    rows = sample_rows(cfg, name)
    images_dir = Path(cfg["images"])
    columns = {field.name: [] for field in SCHEMA}
    for s in rows:
        blobs = [read_image(images_dir / f) for f in s.file_names]
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
