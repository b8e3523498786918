"""Readers for calibration sources: COCO captions, ShareGPT conversations, plain-text corpora.

Every reader validates as it goes and raises VlmquantError naming the file and field.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from vlmquant.errors import VlmquantError


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str
    images: tuple[int, ...] = ()  # indices into the sample's image list, shown before the text


@dataclass(frozen=True)
class Sample:
    sample_id: str
    image_ids: tuple[str, ...]
    file_names: tuple[str, ...]  # relative to the image folder
    turns: tuple[Turn, ...]


def _load_json(path):
    path = Path(path)
    if not path.is_file():
        raise VlmquantError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmquantError(f"{path}: not valid JSON ({e})") from None


def _field(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise VlmquantError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise VlmquantError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def read_coco_captions(captions_path, prompt):
    """COCO `captions_*.json` → one candidate per image: (image id, file name, [captions]).

    Returns a list of (image_id, file_name, captions) sorted by image id.
    """
    data = _load_json(captions_path)
    where = str(captions_path)
    images = _field(data, "images", list, where)
    annotations = _field(data, "annotations", list, where)
    files = {}
    for i, img in enumerate(images):
        image_id = _field(img, "id", (int, str), f"{where}: images[{i}]")
        files[image_id] = _field(img, "file_name", str, f"{where}: images[{i}]")
    captions = {image_id: [] for image_id in files}
    for i, ann in enumerate(annotations):
        image_id = _field(ann, "image_id", (int, str), f"{where}: annotations[{i}]")
        text = _field(ann, "caption", str, f"{where}: annotations[{i}]").strip()
        if image_id not in captions:
            raise VlmquantError(f"{where}: annotations[{i}].image_id {image_id!r} is not in 'images'")
        captions[image_id].append(text)
    for image_id, caps in captions.items():
        if not caps:
            raise VlmquantError(f"{where}: image {image_id!r} ({files[image_id]}) has no caption in 'annotations'")
    return [(str(k), files[k], caps) for k, caps in sorted(captions.items(), key=lambda kv: str(kv[0]))]


def read_sharegpt(path):
    """ShareGPT json/jsonl (`{"id", "image", "conversations": [{"from", "value"}]}`) → samples.

    An `<image>` placeholder in a human turn places the image at the start of that turn; a
    conversation without one shows the image before the first human turn.
    """
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise VlmquantError(f"{path}: expected a list of conversations")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    samples = []
    for i, row in enumerate(rows):
        where = f"{path}: [{i}]"
        image = _field(row, "image", str, where)
        conv = _field(row, "conversations", list, where)
        turns, placed = [], False
        for j, msg in enumerate(conv):
            who = _field(msg, "from", str, f"{where}.conversations[{j}]")
            if who not in roles:
                raise VlmquantError(f"{where}.conversations[{j}]: field 'from' must be human or gpt, got {who!r}")
            text = _field(msg, "value", str, f"{where}.conversations[{j}]")
            images = ()
            if "<image>" in text:
                text, images, placed = text.replace("<image>", "").strip(), (0,), True
            turns.append(Turn(roles[who], text, images))
        if not turns or not any(t.role == "assistant" for t in turns):
            raise VlmquantError(f"{where}: field 'conversations' has no gpt turn")
        if not placed:
            first = next(k for k, t in enumerate(turns) if t.role == "user")
            turns[first] = Turn("user", turns[first].text, (0,))
        sample_id = str(row.get("id", i))
        samples.append(Sample(sample_id, (sample_id,), (image,), tuple(turns)))
    return samples


def read_text_corpus(path):
    """jsonl of `{"text": ...}` → list of paragraphs."""
    rows = _load_json(path)
    return [_field(r, "text", str, f"{path}: line {i + 1}") for i, r in enumerate(rows)]
