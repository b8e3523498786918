"""Synthetic visual question answering over real photos: the task the model organism learns.

A scene is a 112x112 crop of one of the photos the package ships (vlmquant.demo.dataset) with
one to four shapes drawn on it, each in its own cell of a 2x2 grid, all in different colours.
Every scene has one question of each kind (colour, shape, count, position) with a one- or
two-word answer, and a one-line caption. Everything is a pure function of (split, index, seed):

  train    scenes of the "train" stream; training uses every question and the caption
  calib    the first n train scenes, one conversation each (kinds and caption in turn)
  heldout  scenes of the "heldout" stream, one question each (kinds in turn)

The layout (objects and questions) and the drawing use separate random streams, so questions
and answers are known without rendering (the blind baseline needs only those).
"""
import functools
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from vlmquant.demo.dataset import PHOTO_SOURCES, photo_path
from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path

IMAGE_SIZE = 112  # pixels; the Qwen2-VL processor keeps it: 8x8 patches of 14, 4x4 = 16 tokens
CELL = IMAGE_SIZE // 2
BACKGROUND_SIDE = 224  # photos are shrunk once so their short side has this many pixels
COLOURS = {"red": (230, 30, 30), "yellow": (250, 220, 30), "green": (40, 170, 60),
           "blue": (40, 80, 235), "purple": (150, 50, 200), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the grid cells in reading order
NUMBERS = ("zero", "one", "two", "three", "four")
KINDS = ("colour", "shape", "count", "position")
CAPTION_PROMPT = "Describe this image."
# lmms-eval style instruction; training appends it to half the questions so both forms work
POST_PROMPT = "Answer the question using a single word or phrase."
SPLITS = ("train", "calib", "heldout")
STREAMS = {"train": "train", "calib": "train", "heldout": "heldout"}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cell: int  # index into POSITIONS


@dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS, or "caption"
    template: str
    question: str
    answer: str


@dataclass(frozen=True)
class Layout:
    stream: str
    index: int
    seed: int
    shapes: tuple[Shape, ...]
    questions: tuple[Question, ...]  # one per kind, in KINDS order
    caption: str


def _rng(seed, stream, index, part):
    # str seeds are hashed with SHA-512 by random.seed: stable across runs and platforms
    return random.Random(f"vlmquant-organism/{seed}/{stream}/{index}/{part}")


def _ask(kind, template, answer, **fields):
    return Question(kind, template, template.format(**fields), answer)


def _questions(shapes, rng):
    by_shape = {s: [o for o in shapes if o.shape == s] for s in SHAPES}
    single = [o for o in shapes if len(by_shape[o.shape]) == 1]
    pick = rng.choice(shapes)
    if single and rng.random() < 0.6:
        o = rng.choice(single)
        colour = _ask("colour", "What colour is the {shape}?", o.colour, shape=o.shape)
    else:
        colour = _ask("colour", "What colour is the shape in the {position}?", pick.colour,
                      position=POSITIONS[pick.cell])
    o = rng.choice(shapes)
    shape = _ask("shape", "What shape is the {colour} one?", o.shape, colour=o.colour)
    if rng.random() < 0.4:
        count = _ask("count", "How many shapes are there?", str(len(shapes)))
    else:
        # a shape of the scene two times in three, else one that is absent (answer 0)
        absent = [s for s in SHAPES if not by_shape[s]]
        s = rng.choice(shapes).shape if rng.random() < 2 / 3 or not absent else rng.choice(absent)
        count = _ask("count", "How many {plural} are there?", str(len(by_shape[s])), plural=PLURALS[s])
    o = rng.choice(shapes)
    position = _ask("position", "Where is the {colour} {shape}?", POSITIONS[o.cell], colour=o.colour,
                    shape=o.shape)
    return colour, shape, count, position


def caption_of(shapes):
    """One line naming every shape with its colour and position, in reading order."""
    parts = [f"a {o.colour} {o.shape} at the {POSITIONS[o.cell]}" for o in sorted(shapes, key=lambda o: o.cell)]
    head = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    noun = "shape" if len(parts) == 1 else "shapes"
    return f"{NUMBERS[len(parts)].capitalize()} {noun}: {head}."


def layout(split, index, seed=0):
    """The shapes, questions and caption of scene `index` of `split` (no image)."""
    if split not in SPLITS:
        raise VlmquantError(f"organism task: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    stream = STREAMS[split]
    rng = _rng(seed, stream, index, "layout")
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    colours = rng.sample(sorted(COLOURS), n)
    shapes = []
    for cell, colour in zip(cells, colours):
        # repeats are common so that counting a shape is not always 0 or 1
        repeat = shapes and rng.random() < 0.4
        shape = rng.choice(shapes).shape if repeat else rng.choice(SHAPES)
        shapes.append(Shape(shape, colour, cell))
    shapes = tuple(shapes)
    return Layout(stream, index, seed, shapes, _questions(shapes, rng), caption_of(shapes))


@functools.lru_cache(maxsize=4)
def backgrounds(photo_dir=None):
    """The packaged photos as RGB images with short side BACKGROUND_SIDE, in sorted name order.

    `photo_dir` holds copies of the files named in PHOTO_SOURCES (e.g. on a machine without
    scikit-image); by default they are read from the installed packages.
    """
    out = []
    for name in sorted(PHOTO_SOURCES):
        path = Path(photo_dir) / name if photo_dir else photo_path(name)
        if not path.is_file():
            raise VlmquantError(f"organism task: photo {path} not found; copy {name} there or drop photo_dir")
        with Image.open(path) as img:
            img = img.convert("RGB")
        scale = BACKGROUND_SIDE / min(img.size)
        out.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR))
    return tuple(out)


def _polygon(shape, cx, cy, r):
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(math.pi * (k / 5 - 0.5)),
                 cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
    a = 0.36 * r  # cross: half-width of the arms
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a)]


def render(scene, photo_dir=None):
    """The 112x112 RGB image of a Layout: a random photo crop with its shapes drawn on top."""
    rng = _rng(scene.seed, scene.stream, scene.index, "image")
    photos = backgrounds(photo_dir)
    photo = photos[rng.randrange(len(photos))]
    side = rng.randint(BACKGROUND_SIDE * 2 // 5, BACKGROUND_SIDE)
    x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
    img = photo.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for o in scene.shapes:
        r = rng.randint(12, 22)  # half the shape's extent, inside a 56-pixel cell
        cx = (o.cell % 2) * CELL + rng.randint(r + 3, CELL - r - 3)
        cy = (o.cell // 2) * CELL + rng.randint(r + 3, CELL - r - 3)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(0, 0, 0), width=2)
        elif o.shape == "square":
            h = round(0.85 * r)
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill, outline=(0, 0, 0), width=2)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill, outline=(0, 0, 0), width=2)
    return img


def image_hash(img):
    """sha256 of an image's size, mode and raw pixels (independent of the file encoding)."""
    h = hashlib.sha256(f"{img.size}{img.mode}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def instances(split, n, seed=0):
    """(layout, question) pairs of the first `n` scenes of `split`: one per scene for calib and
    heldout (as described above); for train every question of each scene and its caption (kind
    "caption"), 5n pairs."""
    if split == "train":
        out = []
        for i in range(n):
            scene = layout(split, i, seed)
            out += [(scene, q) for q in scene.questions]
            out.append((scene, Question("caption", CAPTION_PROMPT, CAPTION_PROMPT, scene.caption)))
        return out
    cycle = len(KINDS) + (split == "calib")
    out = []
    for i in range(n):
        scene = layout(split, i, seed)
        k = i % cycle
        q = scene.questions[k] if k < len(KINDS) else Question("caption", CAPTION_PROMPT, CAPTION_PROMPT,
                                                               scene.caption)
        out.append((scene, q))
    return out


def _sharegpt(row_id, image, q):
    return {"id": row_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + q.question},
                              {"from": "gpt", "value": q.answer}]}


HELDOUT_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("question", pa.string()),
                            ("answer", pa.string()), ("kind", pa.string())])


def write_organism_data(out_dir, n_calib=256, n_heldout=1000, seed=0, photo_dir=None):
    """Write calib.jsonl, heldout.jsonl (ShareGPT; image paths relative to images/),
    images/{calib,heldout}/NNNNNN.png and heldout.parquet (HELDOUT_SCHEMA) under `out_dir`.

    Reruns give byte-identical files. Raises VlmquantError if a held-out image equals a
    calibration image. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    hashes = {}
    table = {f.name: [] for f in HELDOUT_SCHEMA}
    for split, n in (("calib", n_calib), ("heldout", n_heldout)):
        rows, hashes[split] = [], set()
        for scene, q in instances(split, n, seed):
            img = render(scene, photo_dir)
            hashes[split].add(image_hash(img))
            name, data = f"{split}/{scene.index:06d}.png", png_bytes(img)
            with atomic_path(out_dir / "images" / name) as tmp:
                tmp.write_bytes(data)
            row_id = f"{split}-{scene.index:06d}"
            rows.append(_sharegpt(row_id, name, q))
            if split == "heldout":
                for key, value in zip(HELDOUT_SCHEMA.names, (row_id, data, q.question, q.answer, q.kind)):
                    table[key].append(value)
        with atomic_path(out_dir / f"{split}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    if hashes["calib"] & hashes["heldout"]:
        raise VlmquantError(f"organism task (seed {seed}): a held-out image equals a calibration image; "
                            "use another seed")
    with atomic_path(out_dir / "heldout.parquet") as tmp:
        pq.write_table(pa.table(table, schema=HELDOUT_SCHEMA), tmp, compression="zstd")
    return out_dir


def read_heldout(path):
    """Rows of a heldout.parquet as dicts (image as PNG bytes)."""
    path = Path(path)
    if not path.is_file():
        raise VlmquantError(f"{path}: file not found; write it with vlmquant.organism.task.write_organism_data")
    table = pq.read_table(path)
    if table.schema.names != HELDOUT_SCHEMA.names:
        raise VlmquantError(f"{path}: columns {table.schema.names}, expected {HELDOUT_SCHEMA.names}")
    return table.to_pylist()
