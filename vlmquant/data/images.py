"""Image decoding shared by the calib stage (its check) and the inputs stage (what the model sees).

`decode_image` turns a file's bytes into the RGB image a transformers image processor builds
from it, so calibration sees the pixels inference sees:

- transparency (RGBA, LA, PA, palette or greyscale/RGB with a tRNS colour) is composited onto
  white, exactly as transformers 5.24's `image_transforms.convert_to_rgb` does (every image
  processor applies it to a PIL image when `do_convert_rgb` is set, as all supported families
  do) and as vLLM's image loader does. Done here with PIL rather than by calling transformers:
  up to at least transformers 5.17 that function was a plain `convert("RGB")`, which keeps the
  hidden colour of transparent pixels (usually black), and the calib and inputs stages must
  give the same pixels whichever transformers is installed.
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as transformers does whenever it
  opens a file itself (`image_utils.load_image`, `load_image_as_tensor`): a photo is calibrated
  upright, the way its caption describes it. A PIL image handed to a processor is not rotated.
- multi-frame files (animated GIF/PNG/WebP, MPO, multi-page TIFF) give their first frame, as
  PIL and transformers' `load_image` do.
- 16-bit greyscale (`I;16*`, or `I` from a PNG) is scaled to 8 bits (v / 257, rounded);
  `convert_to_rgb` would clip it to 255 (all white). Modes whose range or colour space is
  ambiguous (`I` from other formats, `F`, `LAB`, `HSV`, premultiplied `RGBa`/`La`) are refused.
- truncated files are refused even where another library set PIL's `LOAD_TRUNCATED_IMAGES`.
"""
import contextlib
import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmquant.errors import VlmquantError

# modes PIL converts to the right RGB image (after compositing any transparency)
RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Qwen2-VL's smart_resize (transformers models/qwen2_vl/image_processing_qwen2_vl.py, shared by
# Qwen2.5-VL, Qwen3-VL and Qwen3.5) raises when max(h, w) / min(h, w) > 200.
MAX_ASPECT_RATIO = 200
# Qwen's reference smart_resize (qwen-vl-utils, transformers 4.x, the Qwen3-VL video processor)
# refuses a side shorter than its factor: 28 (Qwen2/2.5-VL), 32 (Qwen3-VL, Qwen3.5). transformers
# 5.24's image processors upsample such images instead; either way they carry no usable detail.
MIN_SIDE = 32


@contextlib.contextmanager
def _refuse_truncated():
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _sixteen_bit_to_8(img):
    """16-bit greyscale → L (or LA where a tRNS grey level marks transparency): v / 257, rounded."""
    values = np.asarray(img).astype(np.uint32)  # (H, W)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (grey, alpha))
    return grey


def _to_rgb(img):
    """RGB with transparency composited onto white (transformers 5.24's convert_to_rgb)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def decode_image(data: bytes, where: str) -> Image.Image:
    """The RGB image a processor sees for an image file's bytes (see the module docstring).

    Returns a loaded PIL image of mode "RGB", size (width, height) after EXIF orientation.
    Raises VlmquantError naming `where` (e.g. the file and sample id) for unreadable, truncated
    or unsupported images.
    """
    try:
        with _refuse_truncated(), Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, fmt = img.mode, img.format
            img = ImageOps.exif_transpose(img)
            if mode in SIXTEEN_BIT_MODES or (mode == "I" and fmt == "PNG"):
                img = _sixteen_bit_to_8(img)
            elif mode not in RGB_MODES:
                raise VlmquantError(f"{where}: image mode {mode} is not supported; save it as 8-bit RGB")
            return _to_rgb(img)
    except VlmquantError:
        raise
    except UnidentifiedImageError:
        raise VlmquantError(f"{where}: not a readable image (PIL cannot identify its format)") from None
    except Exception as e:  # PIL raises many types for bad files
        raise VlmquantError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None


def check_image_size(size, where):
    """Refuse an image (width, height) that a supported processor cannot take (MAX_ASPECT_RATIO,
    MIN_SIDE above). Raises VlmquantError naming `where`."""
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise VlmquantError(f"{where}: image is {width}x{height} pixels; sides shorter than {MIN_SIDE} pixels "
                            f"are refused by Qwen-family processors; remove it or use a larger copy")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise VlmquantError(f"{where}: image is {width}x{height} pixels, aspect ratio {ratio:.2f}, over "
                            f"{MAX_ASPECT_RATIO}, which Qwen-family processors refuse; crop or remove it")
