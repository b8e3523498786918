"""An lmms-eval model for vlmquant checkpoints: `python -m lmms_eval --model vlmquant ...`.

It loads a model folder (fp, a pseudo-quantized or a compressed-tensors checkpoint) with its
family's adapter (vlmquant.models.families: transformers class, processor, image-only where
torchvision is missing), applies the processor's chat template with the images before the
question, and decodes greedily. Where the folder's quantization.json has a weight-activation
scheme (W4A8, W8A8, FP8) the decoder linears' inputs are fake-quantized during generation, as in
vlmquant's own eval.

lmms-eval finds it through the `lmms_eval.models` entry point (`manifest` below). This module
imports lmms_eval and is only imported by lmms-eval.
"""
import json

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vlmquant.errors import VlmquantError
from vlmquant.export.checkpoint import runtime_activations
from vlmquant.models import folder_family, get_adapter
from vlmquant.models.loading import resolve_device, resolve_dtype
from vlmquant.quant.model import quantized_activations

MODEL_ID = "vlmquant"


def manifest():
    """The lmms_eval.models entry point: our model under the name MODEL_ID."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmquantVLM")


class VlmquantVLM(lmms):
    """model_args: pretrained=<folder>[,family=][,device=auto|cpu|cuda][,dtype=][,max_new_tokens=]
    [,trust_remote_code=]. batch_size: questions per generate call (left-padded)."""

    is_simple = True

    # lmms-eval passes batch_size, and device and max_batch_size where given on its command line
    def __init__(self, pretrained, family=None, device=None, dtype=None, batch_size=1, max_batch_size=None,
                 max_new_tokens=32, trust_remote_code=False):
        super().__init__()
        self.adapter = get_adapter(family or folder_family(pretrained, "lmms-eval model_args pretrained"))
        self.device = resolve_device(device or "auto")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = self.adapter.load_model(pretrained, self.dtype, self.device, trust_remote_code)
        self.processor = self.adapter.load_processor(pretrained, trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self.scheme, self.ignored, self.input_scales = runtime_activations(pretrained)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def prompt(self, text, n_images):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def generate(self, contexts, images, gen_kwargs):
        """Greedy continuations (str) of `contexts`, each with its list of PIL `images`."""
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            raise VlmquantError(f"lmms-eval model {MODEL_ID}: decodes greedily only; the task asks for "
                                f"sampling ({gen_kwargs})")
        flat = [img for imgs in images for img in imgs]
        enc = self.processor(text=[self.prompt(c, len(imgs)) for c, imgs in zip(contexts, images)],
                             images=flat or None, padding=True, padding_side="left", return_tensors="pt")
        enc = enc.to(self.device)
        with quantized_activations(self.model, self.adapter, self.scheme, self.ignored, self.input_scales):
            ids = self.model.generate(**enc, do_sample=False, num_beams=int(gen_kwargs.get("num_beams", 1)),
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            texts = [t.split(stop)[0] if stop else t for t in texts]
        return texts

    def generate_until(self, requests):
        # a batch shares one gen_kwargs; answers go back in request order
        args = [r.args for r in requests]
        groups = {}
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        out = [None] * len(args)
        bar = tqdm(total=len(args), desc="vlmquant generate")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                contexts, images = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = args[i]
                    contexts.append(context)
                    images.append(list(doc_to_visual(self.task_dict[task][split][doc_id]) or []))
                for i, text in zip(batch, self.generate(contexts, images, dict(args[batch[0]][1]))):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(f"lmms-eval model {MODEL_ID}: generation tasks only (no loglikelihood)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"lmms-eval model {MODEL_ID}: single-round generation only")
