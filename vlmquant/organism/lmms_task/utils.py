"""lmms-eval hooks of the vlmquant_vqa task (see vlmquant.organism.lmms)."""
import io

from PIL import Image

from vlmquant.organism.lmms import exact_match


def doc_to_visual(doc):
    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answer"])}
