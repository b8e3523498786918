"""Text screens: texts a processor or chat template would misread, refused with one line.

The calib stage does not know the model, so it refuses the image placeholders of every
supported family; the inputs stage adds the special tokens of the model's own tokenizer.
"""
from vlmquant.errors import VlmquantError

# Strings that processors expand into image/video tokens or that mark vision spans; in a caption
# they would be expanded or tokenized as vision tokens. Sources: transformers 5.24 processors
# and the families' tokenizer configs.
PLACEHOLDERS = (
    # Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (Qwen2VLProcessor, Qwen3VLProcessor defaults)
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
    # LLaVA, LLaVA-NeXT, LLaVA-OneVision (processor image_token / video_token); ShareGPT's marker
    "<image>", "<video>",
    # InternVL (tokenizer start_image_token, end_image_token, context_image_token)
    "<img>", "</img>", "<IMG_CONTEXT>",
    # Gemma 3 (tokenizer boi_token, eoi_token, image_token)
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)


def location(where):
    """An error location given as a string, or as a callable returning one (built only on error)."""
    return where() if callable(where) else where


def check_text(text, where, empty_ok=False):
    """Refuse an empty or whitespace-only text (unless `empty_ok`) and any PLACEHOLDERS in it.

    Raises VlmquantError naming `where` (file, record and field; a string, or a callable that
    returns one, built only on error) and the placeholder found.
    """
    if not empty_ok and not text.strip():
        raise VlmquantError(f"{location(where)}: empty text; give it words or remove the entry")
    if "<" not in text:
        return
    for token in PLACEHOLDERS:
        if token in text:
            raise VlmquantError(f"{location(where)}: contains the image placeholder {token!r}, which a processor would "
                                f"expand into image tokens; remove it from the text")


def special_tokens(tokenizer):
    """The strings `tokenizer` turns into special tokens (named ones and added special tokens),
    longest first; whitespace-only tokens are left out."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t.strip()), key=lambda t: (-len(t), t))


def check_text_for_special_tokens(text, tokenizer, where, tokens=None):
    """Refuse a text that contains one of the model's special tokens (e.g. `<|im_end|>`,
    `<|image_pad|>`, `<s>`): the tokenizer would read it as chat structure or a vision token.

    `tokens`: `special_tokens(tokenizer)`, passed when checking many texts. Raises VlmquantError
    naming `where` and the token.
    """
    for token in special_tokens(tokenizer) if tokens is None else tokens:
        if token in text:
            raise VlmquantError(f"{where}: contains {token!r}, a special token of the model's tokenizer; "
                                f"remove it from the text")
