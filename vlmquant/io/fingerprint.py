"""Content fingerprints (sha256) of the files jobs read from outside results/, hashed once per file version.

A file version is its (size, mtime_ns, ctime_ns, inode): a file replaced or rewritten in place gets a new
ctime even when its mtime is put back (touch -r, cp -p, rsync -a, tar x), so it is hashed again; an unchanged
file is looked up. With use_cache(path) the hashes persist in one JSON file (the workflow's
paths.FINGERPRINTS: a model is hashed once, not at every invocation); without, only in this process.

Safetensors shards are checked in the same read, and the result kept with the hash: the header and the file
size (a truncated shard), and the count of non-finite values (NaN, ±Inf) of every floating tensor. Each file is
read once (memory-mapped: the hash and the check take each block while it is in memory), and the files of one
call are read on several threads (hashlib and torch release the GIL): a model folder of N shards costs about its
largest shard's time where the cores and the disk allow.
"""
import fcntl
import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmquant.errors import VlmquantError
from vlmquant.io.atomic import atomic_path
from vlmquant.io.model_folder import safetensors_header

_cache = {"path": None, "entries": None}  # the cache file, and its entries once read: {abs path: entry}
CHUNK = 1 << 24  # elements per isfinite call (bounds the float32 copy of 1-byte dtypes to 64 MB)
BLOCK = 1 << 26  # bytes hashed and checked at a time (a multiple of every element size and of mmap's granularity)
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}  # safetensors dtype → torch dtype name


def use_cache(path):
    """Keep fingerprints in the JSON file `path` (created when first written); None: in this process only."""
    _cache.update(path=None if path is None else Path(path), entries=None)


def _entries():
    if _cache["entries"] is None:
        _cache["entries"] = _read(_cache["path"])
    return _cache["entries"]


def _read(path):
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _save(new):
    """Merge `new` entries into the cache file under a lock (jobs and the workflow write it concurrently)."""
    path = _cache["path"]
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**_read(path), **new}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(merged, sort_keys=True))


def _version(st):
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def nonfinite_counts(path):
    """{tensor name: count of NaN and ±Inf values} of the floating tensors of a safetensors file that have any."""
    return scan(path, digest=False)[1]


def scan(path, digest=True, check=True):
    """(sha256 hex of the file's bytes or None without `digest`, {tensor: non-finite count} of a safetensors file or
    None for another file or without `check`), reading the file once: BLOCK bytes at a time are hashed and, inside
    a floating tensor, checked (count_nonfinite). Raises VlmquantError for a truncated or damaged safetensors file
    (with `check`)."""
    tensors = check and str(path).endswith(".safetensors")
    spans = []  # (start, end, torch dtype, name) of the floating tensors, in file order
    header = safetensors_header(path) if tensors else None
    h = hashlib.sha256() if digest else None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if tensors:
            import torch

            base = 8 + int.from_bytes(f.read(8), "little")
            for name, t in header.items():
                dtype = FLOAT_DTYPES.get(t.get("dtype")) if name != "__metadata__" else None
                if dtype and hasattr(torch, dtype):
                    a, b = t["data_offsets"]
                    spans.append((base + a, base + b, getattr(torch, dtype), name))
            spans.sort()
        counts, first = {}, 0  # first: the first span not yet wholly checked
        for a in range(0, size, BLOCK):
            b = min(a + BLOCK, size)
            # one block mapped at a time: private and writable (torch.frombuffer's need), never written
            block = mmap.mmap(f.fileno(), b - a, access=mmap.ACCESS_COPY, offset=a)
            if h is not None:
                with memoryview(block) as view:
                    h.update(view)
            while first < len(spans) and spans[first][1] <= a:
                first += 1
            for start, end, dtype, name in spans[first:]:
                if start >= b:
                    break
                lo, hi = max(a, start), min(b, end)
                part = torch.frombuffer(block, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=lo - a)
                bad = count_nonfinite(part)
                del part
                if bad:
                    counts[name] = counts.get(name, 0) + bad
            block.close()
    return (h.hexdigest() if h is not None else None), (counts if tensors else None)


def count_nonfinite(t):
    """NaN and ±Inf values of a floating tensor, CHUNK elements at a time: a min and max pass (about 1 GB/s on one
    core; NaN propagates through both), counted only where these are not finite (isfinite is ~10x slower)."""
    import torch

    flat, bad = t.reshape(-1), 0
    for a in range(0, flat.numel(), CHUNK):
        part = flat[a:a + CHUNK]
        part = part.float() if part.element_size() == 1 else part  # float8: no min/max kernels
        if not (torch.isfinite(part.amax()) and torch.isfinite(part.amin())):
            bad += part.numel() - int(torch.isfinite(part).sum())
    return bad


def sha256_file(path) -> str:
    """sha256 (hex) of a file's bytes, uncached."""
    return scan(path, check=False)[0]


def file_entries(files):
    """{file as given: {"version", "sha256"}, plus "nonfinite" ({tensor: count}) for a safetensors file}, each
    computed once per file version (scan; the files not yet known read on up to os.cpu_count() threads). Raises
    VlmquantError for a truncated or damaged safetensors file (the first such in the order given), before any file
    is read."""
    out, todo = {}, {}
    for path in files:
        key = os.path.abspath(path)
        version = _version(os.stat(path))
        entry = _entries().get(key)
        if entry is None or entry["version"] != version:
            if str(path).endswith(".safetensors"):
                safetensors_header(path)
            todo[key] = (path, version)
        out[str(path)] = entry
    new = {}
    if todo:
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            scanned = pool.map(lambda job: scan(job[0]), todo.values())
            for (key, (path, version)), (sha, nonfinite) in zip(todo.items(), scanned):
                entry = {"version": version, "sha256": sha, **({} if nonfinite is None else {"nonfinite": nonfinite})}
                new[key] = _entries()[key] = out[str(path)] = entry
        _save(new)
    return out


def fingerprints(files):
    """{file as given: sha256 of its content} (cached per file version, see file_entries)."""
    return {f: e["sha256"] for f, e in file_entries(files).items()}


def check_finite_files(files):
    """Refuse safetensors files holding non-finite values: one line naming the file, the first such tensor and its
    count. Uses (and fills) the fingerprint cache, so a checked file version is not read again."""
    for f, entry in file_entries(files).items():
        if entry.get("nonfinite"):
            raise nonfinite_error(f, entry["nonfinite"])


def check_finite(tensors, where):
    """Refuse {name: tensor} with a NaN or Inf before it is written to `where`: one line naming it, the tensor and
    the count (a loaded weight, or a tensor about to be written: a non-finite one would be written with exit 0)."""
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = count_nonfinite(t)
            if bad:
                raise nonfinite_error(where, {name: bad})


def nonfinite_error(where, counts):
    """The one-line error for {tensor: non-finite count} found in `where` (a file, or the file to be written)."""
    name, count = sorted(counts.items())[0]
    more = f" (and {len(counts) - 1} more tensors)" if len(counts) > 1 else ""
    return VlmquantError(f"{where}: tensor {name} has {count} non-finite values (NaN or Inf){more}; "
                         "fix or replace the model's weights (nothing non-finite is quantized or written)")
