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


SAMPLE_BYTES = 64  # bytes read at the start, middle and end of every tensor for the weights fingerprint


def weights_fingerprint(folder) -> str:
    """A cheap identity of a model folder's weights: sha256 over config.json, the safetensors index, and per
    *.safetensors file its name, size, header (names, dtypes, shapes, offsets, metadata) and SAMPLE_BYTES at
    the start, middle and end of every tensor's data.

    Another checkpoint of the same shapes (retrained, fine-tuned, re-initialised) changes the sampled bytes;
    a copy of the folder (new times, other place) keeps the fingerprint. It reads about 200 bytes per tensor,
    not the weights (a full sha256 of a 100 GB model takes minutes); an edit confined to unsampled bytes of
    a tensor goes unseen (Snakemake's file times still rerun the jobs that read the file).
    Raises VlmquantError naming the folder when it has no config.json or no safetensors file.
    """
    import struct

    from vlmquant.errors import VlmquantError

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise VlmquantError(f"{folder}: not a model folder with config.json and *.safetensors weights")
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            h.update(f"{name}\0{sha256_file(folder / name)}\n".encode())
    for path in files:
        with open(path, "rb") as f:
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
            h.update(f"{path.name}\0{size}\0".encode() + raw)
            for key, info in sorted(json.loads(raw).items()):
                if key == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                for at in sorted({a, max(a, (a + b) // 2 - SAMPLE_BYTES // 2), max(a, b - SAMPLE_BYTES)}):
                    f.seek(8 + n + at)
                    h.update(f.read(min(SAMPLE_BYTES, b - at)))
    return h.hexdigest()


def with_weights(names, folder) -> dict:
    """`names` (the job's model/calib/run) plus "weights": the model folder's weights_fingerprint."""
    return {**names, "weights": weights_fingerprint(folder)}


def check_weights(recorded, folder, source):
    """Refuse a result made from other weights than the model folder now holds: `recorded` is the "weights"
    fingerprint in its metadata (None: made before fingerprints or elsewhere, accepted). One line naming
    `source` and the folder."""
    from vlmquant.errors import VlmquantError

    if recorded is None:
        return
    current = weights_fingerprint(folder)
    if recorded != current:
        raise VlmquantError(f"{source}: was made from other weights than {folder} holds now (weights fingerprint "
                            f"{recorded[:12]}, the folder's {current[:12]}); make it again from these weights, or point "
                            "models.<name>.path at the weights it was made from")


def check_cache_weights(cache_path, folder):
    """check_weights on a scale cache's metadata ("meta"."weights"); no cache (RTN) passes."""
    if cache_path is None:
        return
    from vlmquant.io.scales import load_cache

    cache = load_cache(cache_path)
    meta = cache.get("meta") if isinstance(cache, dict) else None
    check_weights((meta or {}).get("weights"), folder, f"{cache_path}: scale cache")
