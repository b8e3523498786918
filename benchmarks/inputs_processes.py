"""The `inputs` stage on several CPU processes (issue 30), in one Python process: build_inputs given 1 and k CPUs
(the workers it picks: encode_workers), and the encoding alone on k forked processes and on k threads, whatever
the set's size. Data: synthetic photos through a Qwen2-VL processor that keeps `--image`-pixel images whole
(e2e.py's model folder at the demo shape: the 7B run's processor settings, tiny weights).

Per setting: wall seconds, CPU seconds (this process and its reaped children, user + system) and the load average
before and after, of the fastest of --repeats runs; whether each file is byte for byte the 1-CPU file. `--samples`
takes several set sizes (a small one shows the fork and transfer cost). On a shared machine compare CPU seconds.

    python benchmarks/inputs_processes.py --samples 128 16 8 --image 672 --workers 1 2 --repeats 2 \
        --out benchmarks/results/inputs_processes_cpu.json
"""
import argparse
import os
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import environment, write_json
from e2e import build_model, calib_cfg, write_data


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run, repeats):
    """{wall_s, cpu_s, load_before, load_after} of the fastest of `repeats` calls of run()."""
    best = None
    for _ in range(repeats):
        load, cpu, t = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
        run()
        m = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(cpu_seconds() - cpu, 3),
             "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
        best = m if best is None or m["wall_s"] < best["wall_s"] else best
    return best


def encode(model, calib, workers, threads):
    """encode_rows over the calibration rows on `workers` forked processes, or on `workers` threads of this process."""
    from vlmquant.data.calib import read_calib
    from vlmquant.data.inputs import encode_row, encode_rows

    processor, config, rows, where = model.processor(), model.config(), read_calib(calib), str(calib)
    if not threads:
        return encode_rows(model.adapter, processor, config, rows, where, workers=workers)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda row: encode_row(model.adapter, processor, config, row, where), rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[128, 8])
    ap.add_argument("--image", type=int, default=672, help="image side in pixels: (image/28)^2 image tokens")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-pool comparison")
    ap.add_argument("--work", default="/tmp/vlmquant-inputs-bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from vlmquant.data.calib import build_calib
    from vlmquant.data.inputs import build_inputs
    from vlmquant.data.workers import encode_workers
    from vlmquant.models.loading import open_model

    torch.set_num_threads(1)  # as a 1-thread Snakemake job; the workers set it too
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    build_model(work / "model", "demo", "cpu", args.image)
    model = open_model({"family": "qwen2_vl", "path": str(work / "model")}, "cpu")
    results = {}
    for n in args.samples:
        calib = work / f"calib_{n}.parquet"
        build_calib(calib_cfg(write_data(work / f"data_{n}", n, args.image, seed=1).parent, n), calib)
        rows = results[str(n)] = {}
        reference = None
        for k in args.workers:
            out = work / f"inputs_{n}_{k}.safetensors"
            rows[f"build_inputs_{k}"] = measure(lambda: build_inputs(calib, model, out, workers=k), args.repeats)
            reference = reference or out.read_bytes()
            rows[f"build_inputs_{k}"]["same_bytes_as_1"] = out.read_bytes() == reference
            rows[f"build_inputs_{k}"]["processes"] = encode_workers(n, k)
            rows[f"encode_processes_{k}"] = measure(lambda: encode(model, calib, k, threads=False), args.repeats)
            if not args.no_threads:
                rows[f"encode_threads_{k}"] = measure(lambda: encode(model, calib, k, threads=True), args.repeats)
            print(n, k, rows, flush=True)
        rows["file_mb"] = round(len(reference) / 1e6, 1)
    write_json(args.out, {"settings": vars(args), "env": environment(), "uptime": os.popen("uptime").read().strip(),
                          "results": results,
                          "note": "build_inputs_k: the whole stage (read, screen, encode, pack, write) given k CPUs, "
                                  "on `processes` processes (encode_workers); encode_processes_k / encode_threads_k: "
                                  "the encoding alone (processor load, read, encode_rows) on k forked processes / k "
                                  "threads, whatever the set's size; cpu_s: user + system of this process and its "
                                  "workers"})
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
