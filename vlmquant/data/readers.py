"""Readers for calibration sources: COCO captions, ShareGPT conversations, plain-text corpora.

Every reader validates every record of its file (not only those a seed picks, so an error
never depends on the seed) and raises VlmquantError naming the file, the record (index, or
line for .jsonl) and the field.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from vlmquant.data.screens import check_text, location
from vlmquant.errors import VlmquantError


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: tuple[int, ...] = ()  # indices into the sample's image list, shown before the text


@dataclass(frozen=True)
class Sample:
    sample_id: str
    image_ids: tuple[str, ...]
    file_names: tuple[str, ...]  # relative to the image folder
    turns: tuple[Turn, ...]


# --- files -------------------------------------------------------------------------------------
def _read_text(path):
    path = Path(path)
    if not path.is_file():
        raise VlmquantError(f"{path}: file not found")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as e:
        raise VlmquantError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """json object_pairs_hook: an object with a key twice (json keeps the last silently) is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _parse(text):
    return json.loads(text, object_pairs_hook=_unique_keys)


def is_jsonl(path):
    return Path(path).suffix.lower() == ".jsonl"


def load_json(path):
    """The JSON value of a .json file; errors give the file's line and column."""
    text = _read_text(path)
    try:
        return _parse(text)
    except _DuplicateKey as e:
        raise VlmquantError(f"{path}: an object has the key {e.args[0]!r} twice; keep one") from None
    except json.JSONDecodeError as e:
        hint = "; for one JSON value per line name the file .jsonl" if e.msg == "Extra data" else ""
        raise VlmquantError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}){hint}") from None


def load_jsonl(path):
    """[(line number, value)] of a JSON Lines file; blank lines are skipped, numbers count every line."""
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, _parse(line)))
        except _DuplicateKey as e:
            raise VlmquantError(f"{path}: line {number}: an object has the key {e.args[0]!r} twice; keep one") from None
        except json.JSONDecodeError as e:
            raise VlmquantError(f"{path}: line {number}: not valid JSON at column {e.colno} ({e.msg})") from None
    return rows


def load_records(path):
    """[(where, record)] of a .json list or a .jsonl file; `where` is "file: [i]" or "file: line n"."""
    if is_jsonl(path):
        return [(f"{path}: line {n}", r) for n, r in load_jsonl(path)]
    rows = load_json(path)
    if not isinstance(rows, list):
        raise VlmquantError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return [(f"{path}: [{i}]", r) for i, r in enumerate(rows)]


# --- fields ------------------------------------------------------------------------------------
def _field(obj, key, kind, where):
    """obj[key], checked to be of `kind` (bool is not an int); `where` as in screens.location."""
    if isinstance(obj, dict) and key in obj:
        value = obj[key]
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise VlmquantError(f"{location(where)}: field '{key}' must be {names}, got {type(value).__name__}")
    if not isinstance(obj, dict):
        raise VlmquantError(f"{location(where)}: expected an object with field '{key}', got {type(obj).__name__}")
    raise VlmquantError(f"{location(where)}: missing field '{key}'")


def _id(value, where):
    """A record id (int or str) as the string used in sample ids; 1 and "1" are the same id."""
    key = str(value)
    if not key.strip():
        raise VlmquantError(f"{location(where)}: empty id")
    return key


def check_file_name(name, where):
    """A non-empty relative path inside the image folder (no absolute path, no '..');
    returns its normal form (e.g. "./a//b.png" → "a/b.png") for duplicate checks."""
    parts = name.split("/")
    normal = "/".join(p for p in parts if p not in ("", "."))
    if not name.strip() or "\x00" in name or not normal:
        raise VlmquantError(f"{location(where)}: file name {name!r} is empty or invalid")
    if name.startswith("/") or ".." in parts:
        raise VlmquantError(f"{location(where)}: file name {name!r} must be a relative path inside the image folder "
                            f"(no leading '/', no '..')")
    return normal


# --- COCO --------------------------------------------------------------------------------------
def read_coco_captions(captions_path):
    """COCO `captions_*.json` → [(image_id, file_name, [captions])], in the order of 'images'.

    Refuses, naming the file and entry: ids repeated within 'images' (1 and "1" are the same
    id), file names repeated (after normalizing "./"), empty/absolute/'..' file names, an
    annotation whose image_id is not in 'images', an image without captions, an empty caption
    or one containing an image placeholder (screens.PLACEHOLDERS). Captions are stripped.
    """
    data = load_json(captions_path)
    where = str(captions_path)
    images = _field(data, "images", list, where)
    annotations = _field(data, "annotations", list, where)
    index, files, seen_files = {}, {}, {}
    for i, img in enumerate(images):
        at = lambda: f"{where}: images[{i}]"  # noqa: E731
        image_id = _id(_field(img, "id", (int, str), at), lambda: f"{at()}.id")
        if image_id in index:
            raise VlmquantError(f"{at()}: id {img['id']!r} repeats images[{index[image_id]}] "
                                f"(id {images[index[image_id]]['id']!r}); image ids must be unique")
        file_name = _field(img, "file_name", str, at)
        normal = check_file_name(file_name, lambda: f"{at()}.file_name")
        if normal in seen_files:
            raise VlmquantError(f"{at()}: file_name {file_name!r} repeats images[{seen_files[normal]}]; "
                                f"each image file must appear once")
        index[image_id], files[image_id], seen_files[normal] = i, file_name, i
    captions = {image_id: [] for image_id in files}
    for i, ann in enumerate(annotations):
        at = lambda: f"{where}: annotations[{i}]"  # noqa: E731
        image_id = _id(_field(ann, "image_id", (int, str), at), lambda: f"{at()}.image_id")
        if image_id not in captions:
            raise VlmquantError(f"{at()}: image_id {ann['image_id']!r} is not an id in 'images'")
        text = _field(ann, "caption", str, at).strip()
        check_text(text, lambda: f"{at()}.caption (image {image_id})")
        captions[image_id].append(text)
    for image_id, caps in captions.items():
        if not caps:
            raise VlmquantError(f"{where}: images[{index[image_id]}] (id {image_id}, {files[image_id]}) "
                                f"has no caption in 'annotations'")
    return [(image_id, files[image_id], caps) for image_id, caps in captions.items()]


# --- ShareGPT ----------------------------------------------------------------------------------
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE = "<image>"  # ShareGPT's image marker, in human turns


def _image_files(row, where):
    if not isinstance(row, dict):
        raise VlmquantError(f"{where}: expected an object with 'image' and 'conversations', got {type(row).__name__}")
    if "image" in row and "images" in row:
        raise VlmquantError(f"{where}: has both 'image' and 'images'; keep one")
    key = "images" if "images" in row else "image"
    value = _field(row, key, (str, list), where)
    names = [value] if isinstance(value, str) else value
    if not names:
        raise VlmquantError(f"{where}: field '{key}' is an empty list; every conversation needs an image")
    for k, name in enumerate(names):
        if not isinstance(name, str):
            raise VlmquantError(f"{where}: {key}[{k}] must be a file name (str), got {type(name).__name__}")
        check_file_name(name, f"{where}: field '{key}'" + (f"[{k}]" if isinstance(value, list) else ""))
    return tuple(names)


def _turns(conv, n_images, where):
    """Turns of one conversation: an optional system turn, then human/gpt alternating, ending with gpt.

    Each human turn's `<image>` markers become images shown at the start of that turn, in order;
    with no marker at all a single image goes before the first human turn.
    """
    if not conv:
        raise VlmquantError(f"{where}: field 'conversations' is empty")
    turns, n_markers = [], 0
    for j, msg in enumerate(conv):
        at = f"{where}: conversations[{j}]"
        who = _field(msg, "from", str, at)
        if who not in ROLES:
            raise VlmquantError(f"{at}: field 'from' must be one of {', '.join(ROLES)}, got {who!r}")
        role = ROLES[who]
        n_chat = sum(t.role != "system" for t in turns)  # human/gpt turns so far
        if (role == "system" and j > 0) or (role != "system" and role != ("user", "assistant")[n_chat % 2]):
            raise VlmquantError(f"{at}: a {who} turn here breaks the order; turns must be an optional system turn, "
                                f"then human and gpt alternating, starting with human")
        text = _field(msg, "value", str, at)
        count = text.count(IMAGE)
        if count and role != "user":
            raise VlmquantError(f"{at}: {IMAGE} in a {who} turn; the image marker belongs in a human turn")
        text = text.replace(IMAGE, "").strip()
        images = tuple(range(n_markers, n_markers + count))
        n_markers += count
        check_text(text, f"{at}.value", empty_ok=bool(images))
        turns.append(Turn(role, text, images))
    if turns[-1].role != "assistant":
        raise VlmquantError(f"{where}: the conversation must end with a gpt turn")
    if n_markers == 0 and n_images == 1:
        first = next(k for k, t in enumerate(turns) if t.role == "user")
        turns[first] = Turn("user", turns[first].text, (0,))
    elif n_markers != n_images:
        raise VlmquantError(f"{where}: {n_markers} {IMAGE} markers in the human turns for {n_images} images; "
                            f"give one marker per image" + (" (or none for a single image)" if n_images == 1 else ""))
    return tuple(turns)


def read_sharegpt(path):
    """ShareGPT json/jsonl → samples, in file order.

    Record: `{"id", "image" (file name or list of them; "images" also accepted), "conversations":
    [{"from": "system"|"human"|"gpt", "value"}]}`. `id` (int or str) defaults to the record's
    index; ids must be unique (1 and "1" are the same id). See _turns for the turn rules; texts
    are stripped and screened like COCO captions. Several conversations may share an image file.
    """
    samples, seen = [], {}
    for i, (where, row) in enumerate(load_records(path)):
        files = _image_files(row, where)
        sample_id = _id(_field(row, "id", (int, str), where) if "id" in row else i, f"{where}.id")
        if sample_id in seen:
            raise VlmquantError(f"{where}: id {sample_id!r} repeats {seen[sample_id]}; ids must be unique")
        seen[sample_id] = where
        turns = _turns(_field(row, "conversations", list, where), len(files), where)
        image_ids = (sample_id,) if len(files) == 1 else tuple(f"{sample_id}:{k}" for k in range(len(files)))
        samples.append(Sample(sample_id, image_ids, files, turns))
    return samples


# --- text corpus -------------------------------------------------------------------------------
def read_text_corpus(path):
    """jsonl of `{"text": ...}` → list of paragraphs; texts with image placeholders are refused."""
    paragraphs = []
    for where, row in load_records(path):
        text = _field(row, "text", str, where)
        check_text(text, f"{where}.text", empty_ok=True)
        paragraphs.append(text)
    return paragraphs
