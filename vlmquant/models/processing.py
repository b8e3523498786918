"""Processor loading that works with and without torchvision.

Qwen2-VL, LLaVA-OneVision and InternVL processors carry a video processor that needs
torchvision. Where torchvision is missing (e.g. the CPU torch wheel here), the same
processor class without its `video_processor` attribute handles images, chat templates,
save and reload.
"""
import transformers


def image_only(cls):
    """`cls` without its `video_processor` attribute; keeps the class name for saved configs."""

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(path, cls, trust_remote_code=False):
    """AutoProcessor where it works, else the image-only variant of `cls`."""
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ImportError, ValueError, TypeError):
        return image_only(cls).from_pretrained(path)
