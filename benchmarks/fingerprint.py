"""Cost of the content fingerprints of source files (vlmquant.io.fingerprint, issue 23): a safetensors shard of
--gib GiB of random bf16 weights (one tensor per 256 MiB) is fingerprinted cold (sha256 plus the header and
non-finite checks, one pass), then again from the cache file (a file version: size, mtime, ctime, inode), best of
--repeats each. The cold cost scales with bytes: seconds_per_15gb extrapolates it to a 15 GB model folder.

    python benchmarks/fingerprint.py --gib 2 --out benchmarks/results/fingerprint_cpu.json
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--root", default=None, help="folder for the shard (default: a temporary one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        shard, cache = Path(tmp) / "model.safetensors", Path(tmp) / "fingerprints.json"
        n = int(args.gib * 4)  # tensors of 256 MiB
        save_file({f"w{i}": torch.randn(8192, 16384).to(torch.bfloat16) for i in range(n)}, shard)
        size = shard.stat().st_size
        cold, cached = [], []
        for _ in range(args.repeats):
            os.utime(shard)  # a new file version: hashed again
            cache.unlink(missing_ok=True)
            F.use_cache(cache)
            t = time.perf_counter()
            F.fingerprints([str(shard)])
            cold.append(time.perf_counter() - t)
            F.use_cache(cache)  # a fresh process's view: the entries read from the file
            t = time.perf_counter()
            F.fingerprints([str(shard)])
            cached.append(time.perf_counter() - t)
    mb_s = size / 1e6 / min(cold)
    result = {"env": environment(), "settings": vars(args), "bytes": size, "seconds_cold": cold,
              "seconds_cached": cached, "mb_per_s_cold": round(mb_s, 1),
              "seconds_per_15gb": round(15e9 / 1e6 / mb_s, 1), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
