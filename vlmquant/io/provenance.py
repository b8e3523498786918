"""Provenance recorded in every output: config subset, input hashes, package versions."""
import hashlib
import json
from importlib import metadata
from pathlib import Path

PACKAGES = ("vlmquant", "torch", "transformers", "safetensors", "pyarrow", "pillow")


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def dumps(obj) -> str:
    """Canonical JSON (sorted keys, no whitespace) so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def folder_digest(path) -> str:
    """sha256 over the names and sha256s of every file in a folder (sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
