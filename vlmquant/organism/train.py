"""Train the organism on the task's train split and save it with its held-out accuracy.

    python -m vlmquant.organism.train --out DIR --steps 4000 --seed 0 [--train-images 40000] ...

Every training scene gives five instances (four questions, half of them followed by
task.POST_PROMPT, and the caption). The loss is the cross-entropy of the answer tokens and the
closing <|im_end|>, averaged per instance, then over the batch. AdamW with linear warm-up and
cosine decay; bf16 autocast on CUDA. The run ends with greedy exact-match accuracy on the
held-out split and writes DIR (a Hugging Face folder, weights in bf16) with training.json.
"""
import argparse
import json
import math
import mmap
import multiprocessing
import platform
import sys
import time
from importlib import metadata

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from vlmquant.errors import VlmquantError
from vlmquant.organism import score, task
from vlmquant.organism.model import build_organism, load_organism, save_organism

WARMUP = 200
EVAL_ROWS = 200  # held-out questions scored during training
_worker = {}  # what forked encoding workers share: processor, model, seed, photo_dir, pixels


def equal_length_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                           cu_seq_lens_q=None, **kwargs):
    """Qwen2-VL vision attention over images of one size as one batched SDPA call.

    The vision tower attends within each image (block-diagonal over cu_seqlens); outside flash
    attention transformers loops over the images in Python. With equal lengths the blocks are
    a batch: query/key/value (1, H, n*L, D) → (n, H, L, D). Returns ((1, n*L, H, D), None) like
    the flash interface. Registered under a name containing "flash", which selects that path.
    """
    n = cu_seq_lens_q.numel() - 1
    _, heads, seq, dim = query.shape
    if seq % n or not torch.all(cu_seq_lens_q.diff() == seq // n):
        raise VlmquantError(f"organism training: images of different sizes in one batch ({cu_seq_lens_q.tolist()})")
    q, k, v = (x.reshape(heads, n, seq // n, dim).transpose(0, 1) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # (n, H, L, D)
    return out.transpose(1, 2).reshape(1, seq, heads, dim), None


BATCHED_VISION = "flash_equal_length"
transformers.AttentionInterface.register(BATCHED_VISION, equal_length_attention)


def encode_scene(index):
    """Render and encode one training scene; its pixel_values (P, C) go to the shared buffer.

    Returns (image hash, [(ids (T,), first label position, position_ids (3, T))]), int32 arrays.
    """
    processor, model, seed = _worker["processor"], _worker["model"], _worker["seed"]
    tok = processor.tokenizer
    scene = task.layout("train", index, seed)
    img = task.render(scene, _worker["photo_dir"])
    pix = processor.image_processor(images=[img], return_tensors="pt")
    grid = pix["image_grid_thw"]
    n_image = int(grid.prod()) // model.config.vision_config.spatial_merge_size ** 2
    rng = task._rng(seed, "train", index, "prompt")
    caption = task.Question("caption", task.CAPTION_PROMPT, task.CAPTION_PROMPT, scene.caption)
    samples = []
    for q in scene.questions + (caption,):
        text = q.question
        if q.kind != "caption" and rng.random() < 0.5:
            text += "\n" + task.POST_PROMPT
        prompt = score.prompt(processor, text).replace("<|image_pad|>", "<|image_pad|>" * n_image)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + tok(q.answer + tok.eos_token, add_special_tokens=False)["input_ids"])
        types = (ids == model.config.image_token_id).int()
        positions, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid)
        # numpy, not torch: torch pickles tensors between processes as file descriptors, which
        # runs out of descriptors over thousands of scenes
        samples.append((ids.numpy().astype(np.int32), len(prompt_ids), positions[:, 0].numpy().astype(np.int32)))
    _worker["pixels"][index] = pix["pixel_values"]
    return task.image_hash(img), samples


def _init_worker(state):
    _worker.update(state)
    torch.set_num_threads(1)


def training_data(processor, model, n_images, seed, photo_dir=None, workers=1):
    """The train split encoded once: a dict of tensors (pixels per image; ids, labels, positions,
    image index per instance, padded on the right) and the set of image hashes."""
    shape = processor.image_processor(images=[task.render(task.layout("train", 0, seed), photo_dir)],
                                      return_tensors="pt")["pixel_values"].shape
    # anonymous shared memory (no /dev/shm needed) that the forked workers fill
    buffer = mmap.mmap(-1, n_images * shape.numel() * 2)
    pixels = torch.frombuffer(buffer, dtype=torch.bfloat16).view(n_images, *shape)  # (N, P, C)
    state = dict(processor=processor, model=model, seed=seed, photo_dir=photo_dir, pixels=pixels)
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (state,)) as pool:
        scenes = list(pool.imap(encode_scene, range(n_images), chunksize=64))
    print(f"encoded {n_images} training scenes", flush=True)
    samples = [(i, s) for i, (_, group) in enumerate(scenes) for s in group]
    length = max(len(ids) for _, (ids, _, _) in samples)
    n = len(samples)
    data = dict(pixels=pixels.clone(),
                ids=torch.full((n, length), processor.tokenizer.pad_token_id, dtype=torch.int32),
                labels=torch.full((n, length), -100, dtype=torch.int32),
                positions=torch.zeros((n, 3, length), dtype=torch.int32),
                mask=torch.zeros((n, length), dtype=torch.bool),
                image=torch.tensor([i for i, _ in samples]))
    for k, (_, (ids, start, pos)) in enumerate(samples):
        t = len(ids)
        ids = torch.from_numpy(ids)
        data["ids"][k, :t] = ids
        data["labels"][k, start:t] = ids[start:]
        data["positions"][k, :, :t] = torch.from_numpy(pos)
        data["mask"][k, :t] = True
    return data, {h for h, _ in scenes}


def batch(data, idx, side):
    """Instances `idx` of training_data as model inputs, trimmed to their longest sequence.

    The images go in as one grid of len(idx) frames of side x side patches: Qwen2-VL's vision
    tower attends within each frame and repeats the (h, w) rotary positions per frame, exactly
    as for separate images, but builds them once instead of in a Python loop per image. The
    decoder's M-RoPE positions come precomputed per instance (training_data).
    """
    t = int(data["mask"][idx].sum(1).max())
    pix = data["pixels"][data["image"][idx]]  # (B, P, C)
    grid = torch.tensor([[len(idx), side, side]], device=pix.device)
    return dict(input_ids=data["ids"][idx, :t].long(), attention_mask=data["mask"][idx, :t].long(),
                position_ids=data["positions"][idx, :, :t].long().transpose(0, 1),
                pixel_values=pix.flatten(0, 1), image_grid_thw=grid), data["labels"][idx, :t].long()


def answer_loss(logits, labels):
    """Mean over instances of the mean cross-entropy of their labelled tokens (next-token shift)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T-1)
    counts = (labels != -100).sum(1)
    return (ce.sum(1) / counts).mean()


def lr_factor(step, total):
    warm = min(1.0, (step + 1) / WARMUP)
    progress = min(1.0, max(0, step - WARMUP) / max(1, total - WARMUP))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.init:
        model, processor = load_organism(args.init)
    else:
        model, processor = build_organism(args.seed)
    heldout = score.task_rows("heldout", args.heldout, args.seed, args.photos)
    held_hashes = {task.image_hash(r["image"]) for r in heldout}
    data, train_hashes = training_data(processor, model, args.train_images, args.seed, args.photos, args.workers)
    if held_hashes & train_hashes:
        raise VlmquantError(f"organism: {len(held_hashes & train_hashes)} held-out images equal training images")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = {k: v.to(device) for k, v in data.items()}
    side = task.IMAGE_SIZE // model.config.vision_config.patch_size
    model.to(device)
    t_data = time.time() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    n = len(data["ids"])
    order, cursor = torch.randperm(n, generator=gen), 0
    steps, losses, log = args.steps, [], []
    t_train = time.time()
    for step in range(1, args.steps + 1):
        if step > steps:
            break
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + args.batch_size].to(device)
        cursor += args.batch_size
        inputs, labels = batch(data, idx, side)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step - 1, steps)
        model.train()
        model.config.vision_config._attn_implementation = BATCHED_VISION
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**inputs).logits
        model.config.vision_config._attn_implementation = "sdpa"
        loss = answer_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        if step == 10:
            t_10 = time.time()
        if step == 40 and args.time_budget:
            # fix the schedule's length from the speed of steps 11-40 (the first ones also warm
            # up CUDA), before warm-up ends so that a rerun with --steps has the same schedule
            per_step = (time.time() - t_10) / 30
            steps = min(args.steps, max(WARMUP + 1, int((args.time_budget - (t_10 - t_train)) / per_step) + 10))
            print(f"{per_step * 1000:.1f} ms/step: {steps} steps fit in {args.time_budget:.0f} s", flush=True)
        if step % 100 == 0 or step == steps:
            entry = {"step": step, "loss": round(torch.stack(losses[-100:]).mean().item(), 5),
                     "time_s": round(time.time() - t_train, 1)}
            if step % args.eval_every == 0 or step == steps:
                model.eval()
                entry["heldout_accuracy"] = score.evaluate(model, processor, heldout[:EVAL_ROWS], 256)["overall"]
            log.append(entry)
            print(entry, flush=True)
    train_time = time.time() - t_train
    out = save_organism(model, processor, args.out)  # before scoring, so a failed score keeps the weights
    # evaluate the weights as saved: rounded to bf16, computed in fp32
    model.eval().float()
    answers = score.predict(model, processor, [r["image"] for r in heldout], [r["question"] for r in heldout], 256)
    accuracy = score.score(answers, heldout)
    blind = score.blind_baseline(heldout, n_train=args.train_images, seed=args.seed)
    print(f"held-out accuracy {accuracy}\nblind baseline {blind}", flush=True)
    record = {
        "seed": args.seed, "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": WARMUP,
        "weight_decay": args.weight_decay, "train_images": args.train_images, "train_instances": n,
        "heldout_size": len(heldout), "init": str(args.init) if args.init else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": log[-1]["loss"], "heldout_accuracy": accuracy, "blind_baseline": blind,
        # the first rows alone, for quick checks (tests score them on CPU)
        f"heldout_accuracy_first{EVAL_ROWS}": score.score(answers[:EVAL_ROWS], heldout[:EVAL_ROWS]),
        "heldout_train_overlap": 0,  # images in both, by image_hash (checked above)
        "data_time_s": round(t_data, 1), "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")}, "log": log,
        "command": "python -m vlmquant.organism.train " + " ".join(args.argv),
        "rerun_command": "python -m vlmquant.organism.train " + " ".join(rerun_argv(args.argv, steps)),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def rerun_argv(argv, steps):
    """`argv` with the schedule's final length as --steps and without --time-budget."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--steps", "--time-budget"):
            skip = True
        elif not a.startswith(("--steps=", "--time-budget=")):
            out.append(a)
    return out + ["--steps", str(steps)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (at most, with --time-budget)")
    p.add_argument("--seed", type=int, default=0, help="task, init, and batch order seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--train-images", type=int, default=40000, help="training scenes (5 instances each)")
    p.add_argument("--heldout", type=int, default=score.HELDOUT_SIZE, help="held-out questions to score")
    p.add_argument("--init", help="start from this saved untrained organism instead of building one")
    p.add_argument("--photos", help="folder with copies of the packaged photos (default: installed packages)")
    p.add_argument("--workers", type=int, default=1, help="processes encoding the training scenes")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--time-budget", type=float, help="seconds of training: fewer steps if they would not fit")
    p.add_argument("--eval-every", type=int, default=1000,
                   help=f"steps between scores on {EVAL_ROWS} held-out questions")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


if __name__ == "__main__":
    train(parse())
