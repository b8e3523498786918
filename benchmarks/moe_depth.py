"""The MBQ W4 g128 pipeline on Qwen3-VL-235B-A22B-shaped layers streamed on one GPU: seconds per layer, peak GPU
and host memory of every model stage at two depths, the disk's read throughput, and the whole model's time
projected from them (issue 25, "235B-A22B on one GPU").

Shape 235b-a22b is the text model of Qwen3-VL-235B-A22B-Instruct's config.json: hidden 4096, 64 query heads, 4 kv
heads, head_dim 128, 128 experts, top-8, expert width 1536, every layer MoE, 94 decoder layers, vocabulary 151936,
untied LM head, interleaved M-RoPE sections [24, 20, 20], θ 5e6 (transformers' Qwen3VLMoe defaults are another
model's, so every size is given here). demo-moe is a tiny shape for the CPU.

For each depth a Qwen3-VL-MoE folder is written (common.write_model_folder): the parts outside the decoder layers
(embeddings, LM head, final norm, a one-block vision tower) and the last two decoder layers (the search chunk)
random, the other layers sparse files of zeros (no disk space). Experts are saved fused as transformers 5 saves
them ((E, 2I, H), (E, H, I)). Synthetic text inputs (--samples x --tokens; positions 16-271 counted as vision, the
last 64 as caption) feed the stages, each in a fresh process (stages.py) with memory.stream always: fingerprint (the
weights fingerprint the workflow computes once per model folder and caches; the later stages look it up, as
workflow jobs do), grads, acts (the inputs of the chunk), search (the chunk), pack (compressed-tensors, every expert
per expert in int4, export.packed) of a random scale cache, and with --with-export the pseudo export (5 GB a layer:
not in the default formats). Seconds per layer: the stage's seconds (process start-up excluded) over the decoder
layers it runs: fingerprint, grads, export and pack n, acts n - 2, search 2.

Disk: pack runs at --write-depths (default 4,8); the export, where asked, is removed before the pack runs (at depth 8
it alone would be 42 GB).

Read throughput, measured once on --root's disk: a --read-gib file of random bytes is written and fsynced (the
write throughput), dropped from the page cache (posix_fadvise DONTNEED) and read back buffered, then dropped again
and read with O_DIRECT where the filesystem allows it. The projection takes the slower read.

Projection to the whole model (L = 94 decoder layers), for the default pipeline (fingerprint, grads, acts, search,
pack; merge and eval not measured):

    projected_total_s = sum over stages of (fixed_s + seconds_per_layer x L)
                        + reads x model_bytes / read throughput + packed_bytes / write throughput

fixed_s and seconds_per_layer: the line through the stage's seconds at the two deepest depths (at one depth: fixed 0,
its seconds over its layers, an over-estimate); search runs a 2-layer chunk per job, so its seconds per layer are
the chunk's over 2 (job start-up and loading included). model_bytes: the bf16 weights of L layers and the non-layer
parts (~470 GB); reads: fingerprint, acts, the search chunks together and pack once each, grads twice per round
(forward, then backward from its stored inputs; rounds = its stored inputs at L layers over --grads-store-mb, 1
without a cap); packed_bytes: the pack's bytes per layer x L plus its other bytes. The measured stages read zeros
and page cache, so the disk terms are added on top; they overlap nothing here (an upper bound where reading
overlaps compute). `export_s`: what the pseudo export would add.

    python benchmarks/moe_depth.py --depths 4 --out x.json             (about 5 minutes on one H100)
    python benchmarks/moe_depth.py --depths 4,8 --resume --out x.json  (depth 8 added: about 5 minutes more)
    python benchmarks/moe_depth.py --shape demo-moe --depths 3,4 --write-depths 3,4 --with-export --samples 2 \\
        --tokens 80 --vocab 1024 --read-gib 0.0625 --out x.json

The JSON is written after every stage, so a run cut short keeps what it measured, with its projection; a stage
that fails is recorded (`failed`: its output's tail) and the next ones run. --resume keeps the disk figures and the
finished depths of --out (measured on the same GPU model) and runs the others.
"""
import argparse
import json
import math
import mmap
import os
import shutil
import time
from pathlib import Path

import torch
import transformers

import stages
from vlmquant.models import get_adapter
from common import (QWEN3_SHAPES, environment, qwen3_layer, qwen3_text_config, random_cache, stage_jobs,
                    write_inputs, write_json, write_model_folder)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STAGES = ("fingerprint", "grads", "acts", "search", "export", "pack")  # export (pseudo): --with-export only
FULL_LAYERS = {"235b-a22b": 94, "demo-moe": 94}
MROPE = {128: [24, 20, 20], 64: [8, 12, 12]}  # by head_dim: the t, h, w sections of its rotary frequencies
BLOCK = 64 << 20  # bytes per read and write of the disk measurement
GB = 1e9


def model_config(shape, n_layers, vocab):
    head_dim = QWEN3_SHAPES[shape]["head_dim"]
    text = qwen3_text_config(shape, n_layers, vocab_size=vocab, eos_token_id=vocab - 5, pad_token_id=vocab - 6,
                             rope_parameters={"rope_type": "default", "mrope_section": MROPE[head_dim],
                                              "mrope_interleaved": True, "rope_theta": 5e6}).to_dict()
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                         image_token_id=vocab - 1, video_token_id=vocab - 2,
                                         vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)


def make_folder(root, shape, n_layers, vocab, dtype):
    """The model folder (see the module doc), its last two layers random; returns its path."""
    def new_layer(device, seed):
        return qwen3_layer(shape, device, dtype, seed)[0]

    folder = write_model_folder(root, model_config(shape, n_layers, vocab), model_config(shape, 0, vocab),
                                "Qwen3VLMoeForConditionalGeneration", new_layer, [n_layers - 2, n_layers - 1], dtype,
                                DEVICE)
    # the demo's processor files, which export copies into each checkpoint (no stage tokenizes: write_inputs)
    get_adapter("qwen3_vl_moe").demo()[1].save_pretrained(folder)
    return folder


def disk_throughput(folder, gib):
    """{write_gbps, read_gbps (buffered, after dropping the file from the page cache), read_direct_gbps (O_DIRECT,
    None where the filesystem refuses it), read_used_gbps (the slower read), bytes} of a file of `gib` GiB of random
    bytes in `folder`, removed after. GB = 1e9 bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    path, block = folder / "read-test.bin", os.urandom(BLOCK)
    n = max(1, round(gib * 2**30 / BLOCK))
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    out = {"bytes": n * BLOCK, "write_gbps": n * BLOCK / GB / (time.perf_counter() - t)}
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    for key, flags in (("read_gbps", 0), ("read_direct_gbps", getattr(os, "O_DIRECT", 0))):
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError:
            out[key] = None
            continue
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                t, done = time.perf_counter(), 0
                while (k := f.readinto(buf)) > 0:
                    done += k
                out[key] = done / GB / (time.perf_counter() - t)
        except OSError:  # O_DIRECT refused at the first read
            out[key] = None
    buf.close()
    path.unlink()
    out["read_used_gbps"] = min(v for v in (out["read_gbps"], out["read_direct_gbps"]) if v)
    return out


def folder_bytes(folder):
    """(bytes of decoder-layer tensors, bytes of the others) of a model folder's safetensors files (their headers)."""
    layers = other = 0
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                n = t["data_offsets"][1] - t["data_offsets"][0]
                layers, other = (layers + n, other) if ".layers." in name else (layers, other + n)
    return layers, other


def layers_run(stage, n):
    return {"acts": n - 2, "search": 2}.get(stage, n)


def model_sizes(folder, shape, dtype):
    """{layer_bytes_bf16, other_bytes_bf16}: one decoder layer's weights and the others' (the folder's non-layer
    tensors), in bf16."""
    layer_params = sum(p.numel() for p in qwen3_layer(shape, "meta", dtype)[0].parameters())
    return {"layer_bytes_bf16": 2 * layer_params, "other_bytes_bf16": 2 * folder_bytes(folder)[1] // dtype.itemsize}


def fit(points):
    """(fixed seconds, seconds per layer) of a stage from {layers run: seconds}: the line through the two deepest
    depths (a slope below 0, noise, taken as 0 through the deepest), or at one depth (0, seconds / layers) (the fixed
    costs spread over the layers: an over-estimate)."""
    if len(points) == 1:
        (n, s), = points.items()
        return 0.0, s / n
    (a, sa), (b, sb) = sorted(points.items())[-2:]
    slope = max(0.0, (sb - sa) / (b - a))
    return sb - slope * b, slope


def project(result, args):
    """The whole model's time (see the module doc) from what `result` holds so far."""
    full, sizes = FULL_LAYERS[args.shape], result["sizes"]
    points = {}
    for n, measured in result["depths"].items():
        for stage, m in measured.items():
            if "seconds" in m:
                points.setdefault(stage, {})[layers_run(stage, int(n))] = m["seconds"]
    fits = {stage: fit(p) for stage, p in points.items()}
    stage_s = {stage: fixed + per * full if stage != "search" else per * full for stage, (fixed, per) in fits.items()}
    default = {stage: s for stage, s in stage_s.items() if stage != "export"}  # export.formats' default: packed only
    model_bytes = full * sizes["layer_bytes_bf16"] + sizes["other_bytes_bf16"]
    store = full * args.samples * args.tokens * QWEN3_SHAPES[args.shape]["hidden_size"] * 2
    rounds = math.ceil(store / (args.grads_store_mb * 2**20)) if args.grads_store_mb else 1
    reads = 2 * rounds * ("grads" in default) + sum(s in default for s in ("fingerprint", "acts", "search", "pack"))
    disk = result["disk"]
    packed = sizes.get("packed_layer_bytes", 0) * full + sizes.get("packed_other_bytes", 0)
    read_s = reads * model_bytes / (disk["read_used_gbps"] * GB)
    write_s = packed / (disk["write_gbps"] * GB)
    compute = sum(default.values())
    result["projection"] = {
        "formula": "sum over stages of (fixed_s + seconds_per_layer x layers) + reads x model_bytes / read_used_gbps "
                   "+ packed_bytes / write_gbps",
        "layers": full, "fixed_s": {k: f[0] for k, f in fits.items()},
        "seconds_per_layer": {k: f[1] for k, f in fits.items()}, "stage_s": stage_s, "stages": sorted(default),
        "compute_s": compute, "model_bytes": model_bytes, "reads": reads, "read_s": read_s, "packed_bytes": packed,
        "write_s": write_s, "grads_store_gib": store / 2**30, "grads_rounds": rounds,
        "export_s": stage_s["export"] + model_bytes / (disk["read_used_gbps"] * GB)
                    + model_bytes / (disk["write_gbps"] * GB) if "export" in stage_s else None,
        "note": "fixed_s and seconds_per_layer: the line through the two deepest depths that ran the stage (one "
                "depth: seconds over its layers, fixed 0); search runs one 2-layer chunk per job, so its seconds "
                "per layer (job start-up and loading included) times the layers. The default pipeline (export.formats "
                "[compressed-tensors]): fingerprint once (the workflow hashes the model once and caches it), grads, "
                "acts, search, pack; export_s: what the pseudo checkpoint (formats: [pseudo]) would add. reads: "
                "fingerprint, acts, search (every chunk together) and pack 1 each, grads 2 per round; GB = 1e9 "
                "bytes. grads_store_gib: the inputs grads stores at every layer; without --grads-store-mb they sit "
                "on the GPU where they fit"}
    result["projected_total_s"] = compute + read_s + write_s
    stage_peaks = [m for measured in result["depths"].values() for m in measured.values() if "seconds" in m]
    result["peak_gpu_gib"] = max(m["peak_gpu_gib"] for m in stage_peaks)
    result["peak_host_gib"] = max(m["peak_host_gib"] for m in stage_peaks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="235b-a22b", choices=sorted(FULL_LAYERS))
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--write-depths", default="4,8", help="the depths at which pack (and export) run (disk space)")
    ap.add_argument("--with-export", action="store_true", help="also the pseudo export (5 GB a layer on disk)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16" if DEVICE == "cuda" else "float32")
    ap.add_argument("--grads-store-mb", type=int, default=None, help="memory.grads_store_mb (same cap at every depth)")
    ap.add_argument("--max-batch-mb", type=int, default=None, help="memory.max_batch_mb")
    ap.add_argument("--read-gib", type=float, default=4.0, help="size of the disk measurement's file")
    ap.add_argument("--resume", action="store_true",
                    help="keep the disk figures and the finished depths --out holds (a run cut short goes on)")
    ap.add_argument("--root", default="/tmp/moedepth")
    ap.add_argument("--logs", help="a folder to keep the stages' logs in (default: removed with the model folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    root = Path(args.root)
    memory = {"stream": "always", "grads_store_mb": args.grads_store_mb, "max_batch_mb": args.max_batch_mb}
    write_depths = {int(d) for d in args.write_depths.split(",") if d}
    stage_set = [s for s in STAGES if s != "export" or args.with_export]
    planned = {n: [s for s in stage_set if n in write_depths or s not in ("export", "pack")]
               for n in map(int, args.depths.split(","))}
    result = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).is_file() else {}
    env = environment()
    if result.get("env", env).get("gpu") != env.get("gpu"):
        raise SystemExit(f"{args.out}: measured on {result['env'].get('gpu', 'the CPU')}, this machine has "
                         f"{env.get('gpu', 'no GPU')}; run without --resume")
    result.update(settings=vars(args), env=env, shape=QWEN3_SHAPES[args.shape])
    if not result.get("disk"):
        result["disk"] = disk_throughput(root, args.read_gib)
    result["depths"] = {n: m for n, m in result.get("depths", {}).items()
                        if int(n) in planned and set(m) == set(planned[int(n)])}
    write_json(args.out, result, echo=False)
    for n, wanted in planned.items():
        if str(n) in result["depths"]:
            continue
        folder = root / f"{args.shape}-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        make_folder(folder, args.shape, n, args.vocab, dtype)
        w = folder / "work"
        w.mkdir()
        write_inputs(w / "inputs.safetensors", args.samples, args.tokens, args.vocab)
        random_cache(w / "cache.pt", folder, "qwen3_vl_moe")
        result["sizes"] = model_sizes(folder, args.shape, dtype) | result.get("sizes", {})
        jobs = stage_jobs(folder, "qwen3_vl_moe", args.dtype, memory, n)
        out = result["depths"][str(n)] = {}
        for stage in wanted:
            try:
                out[stage] = stages.run(jobs[stage], log=Path(args.logs or w) / f"{n}_{stage}.log")
            except SystemExit as failed:  # recorded; the stages after it still run (those reading its output fail too)
                out[stage] = {"failed": str(failed)[-3000:]}
                print(n, stage, "failed:", failed, flush=True)
                continue
            out[stage]["seconds_per_layer"] = out[stage]["seconds"] / layers_run(stage, n)
            if stage == "export":
                shutil.rmtree(jobs["export"]["out"])  # 5 GB a layer: gone before the pack writes
            if stage == "pack":
                layer_bytes, other_bytes = folder_bytes(jobs["pack"]["out"])
                result["sizes"].update(packed_layer_bytes=layer_bytes / n, packed_other_bytes=other_bytes)
            print(n, stage, json.dumps(out[stage]), flush=True)
            project(result, args)
            write_json(args.out, result, echo=False)
        shutil.rmtree(folder)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
