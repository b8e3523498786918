"""Provenance recorded in every output: config subset, input hashes, package versions."""
import hashlib
import json
from importlib import metadata
from pathlib import Path

from vlmquant.errors import VlmquantError
from vlmquant.io.fingerprint import fingerprints, sha256_file  # noqa: F401 (sha256_file: one hasher, used from here)

PACKAGES = ("vlmquant", "torch", "transformers", "safetensors", "pyarrow", "pillow")


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


def weights_fingerprint(folder) -> str:
    """The identity of a model folder's weights: sha256 over the names and content sha256s (io.fingerprint, hashed
    once per file version) of config.json, the safetensors index and every *.safetensors file.

    Other weights of the same shapes and size change it, whatever their timestamps; a copy of the folder (new
    times, other place) keeps it. Raises VlmquantError naming the folder when it has no config.json or no
    safetensors file, or naming a truncated shard.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise VlmquantError(f"{folder}: not a model folder with config.json and *.safetensors weights")
    index = folder / "model.safetensors.index.json"
    shas = fingerprints([folder / "config.json", *([index] if index.is_file() else []), *files])
    return sha256_bytes("".join(f"{Path(f).name}\0{sha}\n" for f, sha in shas.items()).encode())


def with_weights(names, folder) -> dict:
    """`names` (the job's model/calib/run) plus "weights": the model folder's weights_fingerprint."""
    return {**names, "weights": weights_fingerprint(folder)}


def check_weights(recorded, folder, source):
    """Refuse a result made from other weights than the model folder now holds: `recorded` is the "weights"
    fingerprint in its metadata (None: made before fingerprints or elsewhere, accepted). One line naming
    `source` and the folder."""
    if recorded is None:
        return
    current = weights_fingerprint(folder)
    if recorded != current:
        raise VlmquantError(f"{source}: was made from other weights than {folder} holds now (weights fingerprint "
                            f"{recorded[:12]}, the folder's {current[:12]}); make it again from these weights, or point "
                            "models.<name>.path at the weights it was made from")
