"""Cost of the content fingerprints of source files (vlmquant.io.fingerprint, issue 23): a model folder of --shards
safetensors shards holding --gib GiB of random bf16 weights in all (tensors of up to 256 MiB) is fingerprinted cold
(sha256 plus the header and non-finite checks, one read per file, the shards on threads), then again from the cache
file (a file version: size, mtime, ctime, inode), best of --repeats each. Next to it, in the same process, the shards
one after another on one thread (`seconds_one_thread`: what the threads gain). The files sit in the page cache: the
figures are the CPU's, not the disk's. seconds_per_15gb extrapolates the cold cost to a 15 GB model folder.

    python benchmarks/fingerprint.py --gib 2 --shards 4 --out benchmarks/results/fingerprint_cpu.json
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import environment, write_json
from vlmquant.io import fingerprint as F


def best(fn, repeats, before=lambda: None):
    out = []
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--root", default=None, help="folder for the shards (default: a temporary one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        cache, shards = Path(tmp) / "fingerprints.json", []
        per_shard = max(1, round(args.gib * 2**30 / args.shards / 2048))  # rows of 1024 bf16 values
        for i in range(args.shards):
            shards.append(str(Path(tmp) / f"model-{i:05d}.safetensors"))
            rows = [min(2**17, per_shard - a) for a in range(0, per_shard, 2**17)]  # 256 MiB tensors of bf16
            save_file({f"w{k}": torch.randn(r, 1024).to(torch.bfloat16) for k, r in enumerate(rows)}, shards[-1])
        size = sum(os.path.getsize(s) for s in shards)

        def fresh():
            for s in shards:
                os.utime(s)  # a new file version: hashed again
            cache.unlink(missing_ok=True)
            F.use_cache(cache)

        F.fingerprints(shards)  # the files read once into the page cache
        cold = best(lambda: F.fingerprints(shards), args.repeats, fresh)
        cached = best(lambda: F.fingerprints(shards), args.repeats, lambda: F.use_cache(cache))
        one_thread = best(lambda: [F.scan(s) for s in shards], args.repeats)
    mb_s = size / 1e6 / min(cold)
    result = {"env": environment(), "settings": vars(args), "bytes": size, "seconds_cold": cold,
              "seconds_cached": cached, "seconds_one_thread": one_thread,
              "threads_speedup": round(min(one_thread) / min(cold), 2), "mb_per_s_cold": round(mb_s, 1),
              "seconds_per_15gb": round(15e9 / 1e6 / mb_s, 1), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
