"""Modality-balanced quantization (MBQ) of vision-language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy, so that `import vlmquant.paths` (the workflow's first import) loads no torch or transformers
    if name == "load_packed":
        from vlmquant.export.loading import load_packed

        return load_packed
    raise AttributeError(f"module 'vlmquant' has no attribute {name!r}")
