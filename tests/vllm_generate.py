"""Greedy generation with vLLM, run by tests/test_vllm.py in the Python named by VLMQUANT_VLLM_PYTHON.

    python vllm_generate.py request.json result.json captures.pt

request.json: {"model": folder, "dtype": "float32", "max_tokens": 8, "logprobs": K, "prompts": [{"text": str,
"image": png path or null}, ...]}. Each prompt is one user turn rendered by the checkpoint's chat template
(LLM.chat, the image part first), run one at a time (max_num_seqs 1).
result.json: {"vllm": version, "outputs": [{"prompt_token_ids", "token_ids", "logprobs": per generated token
{token id: logprob} (its top K and the token itself), "prompt_logprobs": the same per prompt position (null for
the first)}, ...]}.
captures.pt (torch.save): {"linears": {vLLM module name: (input, output)} of every decoder linear (fused
qkv_proj / gate_up_proj, o_proj, down_proj) at its first call, the first prompt's prefill; "pixel_values": the
vision tower's input and "merger": its output at their first call}. Hooks need the engine in this process.
Imports only vLLM, torch and PIL (vlmquant is not installed there).
"""
import json
import os
import sys

# engine and model in this process (forward hooks reach the model); KV cache of 1 GiB instead of most of the RAM
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CAPTURED = {"linears": {}}


def first_call(store, key, what):
    """A forward hook keeping what(args, out) of the module's first call as store[key] (returns None: the output
    stays as it is)."""
    def hook(module, args, out):
        if key not in store:
            store[key] = what(args, out[0] if isinstance(out, tuple) else out)  # vLLM linears: (output, bias)
    return hook


def add_hooks(model):
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LINEARS and not name.startswith("visual"):
            module.register_forward_hook(first_call(CAPTURED["linears"], name, lambda a, o: (a[0].clone(), o.clone())))
        elif name == "visual":
            module.register_forward_hook(first_call(CAPTURED, "pixel_values", lambda a, o: a[0].clone()))
        elif name == "visual.merger":
            module.register_forward_hook(first_call(CAPTURED, "merger", lambda a, o: o.clone()))
    return len(CAPTURED["linears"])


def logprob_dicts(steps):
    if steps is None:
        return None
    return [None if s is None else {str(t): lp.logprob for t, lp in s.items()} for s in steps]


def main(request_path, result_path, captures_path):
    import torch
    import vllm
    from PIL import Image

    req = json.loads(open(request_path).read())
    llm = vllm.LLM(model=req["model"], dtype=req["dtype"], max_model_len=1024, max_num_seqs=1, enforce_eager=True,
                   distributed_executor_backend="uni", limit_mm_per_prompt={"image": 1, "video": 0}, seed=0)
    llm.apply_model(add_hooks)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=req["logprobs"],
                                 prompt_logprobs=req["logprobs"], ignore_eos=True)
    conversations = []
    for p in req["prompts"]:
        content = [{"type": "text", "text": p["text"]}]
        if p["image"]:
            content.insert(0, {"type": "image_pil", "image_pil": Image.open(p["image"]).convert("RGB")})
        conversations.append([{"role": "user", "content": content}])
    outputs = llm.chat(conversations, params, use_tqdm=False)
    result = {"vllm": vllm.__version__, "outputs": [
        {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
         "logprobs": logprob_dicts(o.outputs[0].logprobs), "prompt_logprobs": logprob_dicts(o.prompt_logprobs)}
        for o in outputs]}
    torch.save(CAPTURED, captures_path)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
