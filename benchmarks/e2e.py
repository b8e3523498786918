"""The whole DAG on one device for a random-init Qwen2-VL of a real shape: calib, inputs, grads, acts, search,
merge, export, eval_fp, eval. Wall time and peak memory per stage, and the total. The eval makes the run's
weights in memory from the scale cache (it reads no checkpoint); through Snakemake, `--formats` says which
checkpoints are written (the workflow's default: compressed-tensors, the pack job).

Through Snakemake when it is installed (`--via snakemake`: per-job seconds and max RSS from the rules'
benchmark files), else the stages' library functions in DAG order, one fresh process each as Snakemake would
start them (`--via library`: benchmarks/stages.py, which also reads the peak GPU memory). The JSON says which.
The model folder (random weights in 4 GB shards as the releases, the demo's tokenizer, an image processor that
keeps `--image`-pixel images whole: (image/28)^2 image tokens) and the synthetic photos and captions are built
first, outside the timed DAG; the run's first job starts after Snakemake hashed the new model folder (`timeline`). `--cap-gib` caps the GPU memory of every stage (torch.cuda.set_per_process_memory_fraction).

    python benchmarks/e2e.py --shape 7b --samples 128 --image 672 --out benchmarks/results/e2e_7b_h200.json
    python benchmarks/e2e.py --shape 7b --cap-gib 8 --stream always --out benchmarks/results/stages_7b_cap8gib.json
    python benchmarks/e2e.py --shape demo --samples 4 --eval-samples 2 --image 112 --out x.json   (CPU, seconds)
"""
import argparse
import csv
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import stages
from common import SHAPES, environment, write_json
from vlmquant import paths

REPO = Path(__file__).resolve().parents[1]
VISION = {  # Qwen2-VL vision towers
    "7b": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    "72b": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    "demo": dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2),
}
DEPTH = {"7b": 28, "72b": 80, "demo": 4}
VOCAB = {"7b": 152064, "72b": 152064}
WORDS = ("red", "green", "blue", "striped", "round", "square", "bright", "dark", "small", "large", "soft", "sharp")
SETTINGS = {"batch_size": 4, "kl_top_k": 1000, "hidden_positions": 16}
NOTES = {"library": "each stage a fresh process, one after another (seconds: inside the stage; process_seconds: with "
                    "start-up and imports); total = sum of process_seconds",
         "snakemake": "snakemake --cores all --resources gpu=1; jobs: the rules' benchmark files (s, max_rss; no "
                      "max_rss with the job server, where it counts the job's own process only); total: the whole "
                      "snakemake call (calib, inputs and merge have no benchmark file)"}


def build_model(folder, shape, device, image, seed=0):
    """A random-init Qwen2-VL of `shape` with the demo tokenizer and a processor keeping image x image pixels."""
    import torch
    import transformers

    from vlmquant.models.families.qwen2_vl import QWEN_IMAGE, qwen_tokenizer, qwen_vision_ids
    from vlmquant.models.processing import image_only
    from vlmquant.models.tiny import chatml_template

    tokenizer = qwen_tokenizer()
    text = dict(SHAPES[shape])
    section = text.pop("mrope_section")
    text.update(num_hidden_layers=DEPTH[shape], vocab_size=VOCAB.get(shape, len(tokenizer)),
                max_position_embeddings=32768, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6})
    vision = dict(VISION[shape], hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                        **qwen_vision_ids(tokenizer))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = transformers.GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                            pad_token_id=tokenizer.pad_token_id)
    pixels = image * image
    processor = image_only(transformers.Qwen2VLProcessor)(
        image_processor=transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": pixels}),
        tokenizer=tokenizer, chat_template=chatml_template(QWEN_IMAGE))
    model.save_pretrained(folder, max_shard_size="4GB")  # as the releases shard (Qwen2-VL-7B-Instruct: 5 files)
    processor.save_pretrained(folder)
    path = folder / "processor_config.json"  # as the demo model: AutoProcessor works where torchvision is installed
    processor_config = json.loads(path.read_text())
    processor_config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor"}
    path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return sum(p.numel() for p in model.parameters())


def write_data(folder, n, image, seed):
    """n synthetic image x image photos (smooth colour fields with stripes) and one caption each, COCO-style."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    y, x = np.mgrid[0:image, 0:image] / image
    for k in range(n):
        a, b, c, f = rng.uniform(0.2, 1.0, 4)
        rgb = np.stack([a * x, b * y, c * np.sin(2 * np.pi * f * 8 * (x + y)) ** 2], -1)
        name = f"img_{seed}_{k:04d}.png"
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / "images" / name)
        words = rng.choice(WORDS, 4)
        images.append({"id": k, "file_name": name, "width": image, "height": image})
        annotations.append({"id": k, "image_id": k, "caption": f"A {words[0]} and {words[1]} picture with "
                                                               f"{words[2]} stripes on a {words[3]} field, number {k}."})
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def calib_cfg(data, n):
    return {"source": "coco", "captions": str(data / "captions.json"), "images": str(data / "images"),
            "n_samples": n, "seed": 0, "format": "plain", "prompt": "Describe this image.", "interleave_tokens": 64}


def run_config(args):
    """runs.mbq as check_config normalises it (the search's and merge's params)."""
    from vlmquant.spec import RunSpec

    return RunSpec.from_config("mbq", {"method": "mbq", "w_bit": args.w_bit, "w_group": 128}).search_params()


# --- Snakemake ------------------------------------------------------------------------------------
STARTED = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n(?:local)?rule (\w+):\n((?:    .*\n)*?)    jobid: (\d+)\n"
                     r"((?:    .*\n)*)", re.M)
WILDCARDS = re.compile(r"^    wildcards: (.*)$", re.M)
FINISHED = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\nFinished jobid: (\d+) \(Rule: (\w+)\)$", re.M)


def job_timeline(text):
    """Each job's rule, wildcards, start and end in seconds after Snakemake started (the log's `Date:`; else the
    first job's start), whole seconds as Snakemake stamps them, from a Snakemake log file: [{"rule", "jobid",
    "wildcards", "start", "end"}] in start order. The first start is the time Snakemake took to plan the run
    (the Snakefile, hashing the model files it has not seen, the DAG)."""
    stamp = lambda s: datetime.datetime.strptime(" ".join(s.split()), "%a %b %d %H:%M:%S %Y")  # noqa: E731
    jobs = {}
    for t, rule, before, j, after in STARTED.findall(text):
        wildcards = WILDCARDS.search(before + after)
        jobs[int(j)] = {"rule": rule, "jobid": int(j), "wildcards": wildcards.group(1) if wildcards else "",
                        "start": stamp(t)}
    for t, j, _ in FINISHED.findall(text):
        jobs[int(j)]["end"] = stamp(t)
    began = re.search(r"^  Date: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$", text, re.M)  # the log's header
    zero = datetime.datetime.fromisoformat(began.group(1)) if began else min(j["start"] for j in jobs.values())
    rows = sorted(jobs.values(), key=lambda j: (j["start"], j["jobid"]))
    return [{**j, "start": (j["start"] - zero).total_seconds(),
             "end": (j["end"] - zero).total_seconds() if "end" in j else None} for j in rows]


def via_snakemake(args, work, model_dir, train, held, timeline):
    for name in ("Snakefile", "rules", "scripts", "workflow"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    config = {
        "device": args.device, "memory": {"stream": args.stream},
        "models": {"e2e": {"path": str(model_dir), "family": "qwen2_vl"}},
        "calib": {"e2e": calib_cfg(train, args.samples), "e2e-holdout": calib_cfg(held, args.eval_samples)},
        "targets": {"models": ["e2e"], "calib": ["e2e"], "runs": ["mbq"]},
        "runs": {"mbq": {"method": "mbq", "w_bit": args.w_bit, "w_group": 128, "formats": args.formats}},
        "search": {"layers_per_job": args.layers_per_job or DEPTH[args.shape]},
        "eval": {"calib": "e2e-holdout", **SETTINGS},
    }
    import yaml

    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t = time.perf_counter()
    env = dict(stages_env(), **({} if args.jobserver else {"VLMQUANT_JOBSERVER": "off"}))
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--resources", "gpu=1"],
                         cwd=work, capture_output=True, text=True, env=env)
    total = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-6000:])
    out = {}
    log = max((work / ".snakemake/log").glob("*.snakemake.log"))
    timeline.extend(job_timeline(log.read_text()))
    for path in sorted((work / "results/benchmarks").rglob("*.tsv")):
        with open(path) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        rss = float(row["max_rss"]) / 1024 if row["max_rss"] != "-" and not args.jobserver else None
        out[str(path.relative_to(work / "results/benchmarks"))] = {"seconds": float(row["s"]), "peak_host_gib": rss}
    return out, total


def stages_env():
    import os

    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


# --- library, in DAG order -------------------------------------------------------------------------
def dag(args, work, model_dir, train, held):
    """[(label, job)] of the workflow's jobs for one MBQ run, in an order Snakemake could run them."""
    model = {"family": "qwen2_vl", "path": str(model_dir), "dtype": "auto"}
    base = {"model": model, "device": args.device, "memory": {"stream": args.stream}, "cap_gib": args.cap_gib}
    names = {"model": "e2e", "calib": "e2e", "run": "mbq"}
    ids = {**names, "eval_calib": "e2e-holdout"}
    at = lambda template, **kw: str(work / template.format(**{**ids, **kw}))  # noqa: E731
    inputs, held_inputs = at(paths.INPUTS), at(paths.INPUTS, calib="e2e-holdout")
    per_job = args.layers_per_job or DEPTH[args.shape]
    chunks = [list(range(a, min(a + per_job, DEPTH[args.shape]))) for a in range(0, DEPTH[args.shape], per_job)]
    folders = [at(paths.SCALES, chunk=paths.chunk_id(c[0])) for c in chunks]
    run = {"run": "mbq", "run_config": run_config(args), "names": names}
    jobs = [
        ("calib", {"stage": "calib", "cfg": calib_cfg(train, args.samples), "out": at(paths.CALIB), "name": "e2e"}),
        ("calib_holdout", {"stage": "calib", "cfg": calib_cfg(held, args.eval_samples),
                           "out": at(paths.CALIB, calib="e2e-holdout"), "name": "e2e-holdout"}),
        ("inputs", {"stage": "inputs", "model": model, "calib": at(paths.CALIB), "out": inputs, "name": "e2e"}),
        ("inputs_holdout", {"stage": "inputs", "model": model, "calib": at(paths.CALIB, calib="e2e-holdout"),
                            "out": held_inputs, "name": "e2e"}),
        ("grads", {**base, "stage": "grads", "inputs": inputs, "out": at(paths.GRADS)}),
        ("acts", {**base, "stage": "acts", "inputs": inputs, "starts": [c[0] for c in chunks], "out": at(paths.ACTS)}),
    ]
    jobs += [(f"search_{c[0]:03d}", {**base, **run, "stage": "search", "inputs": inputs, "start": at(paths.ACTS),
                                     "grads": at(paths.GRADS), "layers": c, "out": folder})
             for c, folder in zip(chunks, folders)]
    jobs += [
        ("merge", {"stage": "merge", "model": model, "chunks": folders, "cache": at(paths.SCALE_CACHE),
                   "table": at(paths.SEARCH_TABLE), "expect": {**names, "run_config": run_config(args)}}),
        ("export", {**base, **run, "stage": "export", "cache": at(paths.SCALE_CACHE), "out": at(paths.CHECKPOINT)}),
        ("eval_fp", {**base, "stage": "eval_fp", "inputs": held_inputs, "ref": at(paths.FP_REF),
                     "table": at(paths.FP_TABLE), "settings": SETTINGS, "ids": {"model": "e2e", "eval_calib": "e2e-holdout"}}),
        ("eval", {**base, **run, "stage": "eval", "cache": at(paths.SCALE_CACHE), "inputs": held_inputs,
                  "ref": at(paths.FP_REF), "table": at(paths.EVAL), "settings": SETTINGS, "ids": ids}),
    ]
    return jobs


def via_library(args, work, model_dir, train, held, timeline):
    out = {}
    for label, job in dag(args, work, model_dir, train, held):
        out[label] = stages.run(job, log=work / "logs" / f"{label}.log")
        print(label, json.dumps(out[label]), flush=True)
        write_json(args.out, {"settings": vars(args), "partial": True, "jobs": out}, echo=False)  # kept if cut short
    return out, sum(v["process_seconds"] for v in out.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(DEPTH))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--image", type=int, default=672, help="image side in pixels: (image/28)^2 image tokens")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--layers-per-job", type=int, default=0, help="search layers per job; 0 = all in one job")
    ap.add_argument("--stream", default="auto", choices=["auto", "always", "never"])
    ap.add_argument("--cap-gib", type=float, default=None, help="GPU memory cap of every stage")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--via", default="auto", choices=["auto", "snakemake", "library"])
    ap.add_argument("--formats", nargs="+", default=["compressed-tensors"], choices=["pseudo", "compressed-tensors"],
                    help="the run's checkpoints through Snakemake (the library path runs export: pseudo)")
    ap.add_argument("--no-jobserver", dest="jobserver", action="store_false",
                    help="--via snakemake: each job in its own process (VLMQUANT_JOBSERVER=off), with its peak host memory")
    ap.add_argument("--work", default="/tmp/vlmquant-e2e")
    ap.add_argument("--keep-model", action="store_true", help="reuse the model folder of an earlier run in --work")
    ap.add_argument("--keep-results", action="store_true", help="keep the run's results/ (checkpoint: the model's size)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    work = Path(args.work)
    model_dir = work / f"model-{args.shape}"
    setup = {}
    t = time.perf_counter()
    if not (args.keep_model and (model_dir / "config.json").is_file()):
        shutil.rmtree(model_dir, ignore_errors=True)
        setup["parameters"] = build_model(model_dir, args.shape, device, args.image)
    setup["model_seconds"] = time.perf_counter() - t
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t = time.perf_counter()
    train = write_data(run_dir / "data/train", args.samples, args.image, seed=1).parent
    held = write_data(run_dir / "data/held", args.eval_samples, args.image, seed=2).parent
    setup["data_seconds"] = time.perf_counter() - t
    via = args.via
    if via == "auto":
        via = "snakemake" if subprocess.run([sys.executable, "-c", "import snakemake"], capture_output=True).returncode == 0 \
            else "library"
    runner = via_snakemake if via == "snakemake" else via_library
    timeline = []
    jobs, total = runner(args, run_dir, model_dir, train, held, timeline)
    from safetensors import safe_open

    with safe_open(run_dir / paths.INPUTS.format(model="e2e", calib="e2e"), "pt") as f:
        offsets = f.get_tensor("offsets.tokens")
    result = {"settings": vars(args), "env": environment(), "via": via, "setup": setup, "jobs": jobs, "order": list(jobs),
              "total_seconds": total, "tokens_per_sample": float((offsets[1:] - offsets[:-1]).float().mean()),
              "note": NOTES[via], **({"timeline": timeline} if timeline else {})}
    write_json(args.out, result)
    if not args.keep_results:
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
