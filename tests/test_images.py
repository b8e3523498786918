"""Image decoding: the pixels the model's processor sees, refused files, size screens."""
import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageFile

from vlmquant.data.images import MAX_ASPECT_RATIO, MIN_SIDE, check_image_size, decode_image
from vlmquant.models import family_names, get_adapter
from vlmquant.errors import VlmquantError


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgba_array():
    """48x64: transparent black background, an opaque red box, a half-transparent blue box."""
    a = np.zeros((48, 64, 4), np.uint8)
    a[10:20, 10:30] = (255, 0, 0, 255)
    a[30:40, 30:50] = (0, 0, 255, 128)
    return a


def palette_with_transparency():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    img.paste(1, (0, 0, 20, 40))
    img.paste(2, (20, 0, 30, 40))
    return img  # index 0 (black) is declared transparent when saved


TRANSPARENT = {
    "RGBA": encode(Image.fromarray(rgba_array(), "RGBA")),
    "LA": encode(Image.fromarray(rgba_array()[..., [0, 3]], "LA")),
    "P-tRNS": encode(palette_with_transparency(), transparency=0),
    "GIF-transparency": encode(palette_with_transparency(), "GIF", transparency=0),
    "L-tRNS": encode(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (40, 1)), "L"), transparency=0),
}


@pytest.fixture(scope="module")
def image_processors():
    return {family: get_adapter(family).demo()[1].image_processor for family in family_names()}


def pixels(image_processor, img):
    return image_processor(images=[img], return_tensors="pt")["pixel_values"]


def test_transparent_background_becomes_white():
    rgb = np.asarray(decode_image(TRANSPARENT["RGBA"], "x"))
    assert rgb.shape == (48, 64, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent: white, not black
    assert rgb[15, 15].tolist() == [255, 0, 0]  # opaque red stays red
    assert rgb[35, 35].tolist() == [127, 127, 255]  # alpha 128 blue over white
    p = np.asarray(decode_image(TRANSPARENT["P-tRNS"], "x"))
    assert p[0, 0].tolist() == [255, 0, 0] and p[0, 25].tolist() == [0, 255, 0] and p[0, 35].tolist() == [255] * 3


def processors_composite_onto_white():
    """transformers 5.24 composites transparency onto white; 5.17 and older keep the hidden colour."""
    from transformers.image_transforms import convert_to_rgb

    out = convert_to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0)))
    return np.asarray(out).reshape(-1).tolist() == [255, 255, 255]


@pytest.mark.skipif(not processors_composite_onto_white(), reason="this transformers' processors fill transparency "
                    "with the hidden colour; decode_image composites onto white as transformers 5.24 and vLLM do")
@pytest.mark.parametrize("kind", list(TRANSPARENT))
def test_decoded_pixels_equal_the_processors_own(kind, image_processors):
    """For every family: our decoded image through the processor gives exactly the pixel_values
    the processor makes from the raw PIL image, and PIL's convert("RGB") (the old path) does not."""
    data = TRANSPARENT[kind]
    for family, ip in image_processors.items():
        ours = pixels(ip, decode_image(data, "x"))
        theirs = pixels(ip, Image.open(io.BytesIO(data)))
        assert torch.equal(ours, theirs), family
        if kind in ("RGBA", "LA"):  # (convert("RGB") keeps a tRNS key in .info, which the processor honours)
            assert not torch.equal(ours, pixels(ip, Image.open(io.BytesIO(data)).convert("RGB"))), family


def test_cmyk_and_greyscale_match_the_processor(image_processors):
    rng = np.random.RandomState(0)
    cmyk = encode(Image.fromarray(rng.randint(0, 255, (40, 56, 4), np.uint8), "CMYK"), "JPEG")
    grey = encode(Image.fromarray(rng.randint(0, 255, (40, 56), np.uint8), "L"))
    bilevel = encode(Image.fromarray(rng.randint(0, 2, (40, 56), np.uint8) * 255, "L").convert("1"))
    for data in (cmyk, grey, bilevel):
        assert Image.open(io.BytesIO(data)).mode in ("CMYK", "L", "1")
        for family, ip in image_processors.items():
            assert torch.equal(pixels(ip, decode_image(data, "x")), pixels(ip, Image.open(io.BytesIO(data)))), family


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535], [1000, 128, 40000, 65280]], np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = np.asarray(decode_image(data, "x"))
    assert rgb[..., 0].tolist() == [[0, 1, 128, 255], [4, 0, 156, 254]]  # round(v / 257)
    assert (rgb == rgb[..., :1]).all()  # grey in all three channels
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what the processor itself would do
    assert clipped[0, 2].tolist() == [255, 255, 255]
    # a 16-bit tRNS grey level is transparent: white
    keyed = np.asarray(decode_image(encode(Image.fromarray(values), transparency=1000), "x"))
    assert keyed[1, 0].tolist() == [255] * 3 and keyed[0, 2].tolist() == [128] * 3


@pytest.mark.parametrize("mode,array", [("F", np.full((40, 40), 0.5, np.float32)),
                                        ("I", np.full((40, 40), 70000, np.int32))])
def test_ambiguous_modes_are_refused(mode, array):
    data = encode(Image.fromarray(array, mode), "TIFF")
    with pytest.raises(VlmquantError) as e:
        decode_image(data, "sample 7: data/x.tif")
    assert str(e.value) == f"sample 7: data/x.tif: image mode {mode} is not supported; save it as 8-bit RGB"


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    a = np.zeros((40, 60, 3), np.uint8)
    a[:5, :5] = 255  # white corner at top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.png"
    Image.fromarray(a).save(path, exif=exif)
    ours = decode_image(path.read_bytes(), "x")
    assert ours.size == (40, 60)  # (width, height) of the upright image
    assert np.asarray(ours)[:5, -5:].min() == 255  # the corner is now at top right
    assert np.array_equal(np.asarray(ours), np.asarray(transformers.image_utils.load_image(str(path))))


def test_animated_image_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 2
    ours = np.asarray(decode_image(path.read_bytes(), "x"))
    assert ours[0, 0].tolist() == [255, 0, 0]
    assert np.array_equal(ours, np.asarray(transformers.image_utils.load_image(str(path))))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused_even_when_pil_is_told_to_allow_it(fmt, monkeypatch):
    rng = np.random.RandomState(0)
    data = encode(Image.fromarray(rng.randint(0, 255, (64, 64, 3), np.uint8)), fmt)[:-800]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set globally
    with pytest.raises(VlmquantError, match=r"^sample s1: imgs/a.bin: not a readable image .*truncated"):
        decode_image(data, "sample s1: imgs/a.bin")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as it was


def test_not_an_image():
    with pytest.raises(VlmquantError, match=r"^x.png: not a readable image \(PIL cannot identify its format\)$"):
        decode_image(b"not an image", "x.png")


def test_size_limits_are_the_processors(image_processors):
    """MAX_ASPECT_RATIO is Qwen's rule exactly: 200.0 passes the processor, just over it fails."""
    ok, bad = (32 * MAX_ASPECT_RATIO, 32), (32 * MAX_ASPECT_RATIO + 1, 32)
    check_image_size(ok, "x")
    pixels(image_processors["qwen2_vl"], Image.new("RGB", ok))
    with pytest.raises(ValueError, match="aspect ratio"):
        pixels(image_processors["qwen2_vl"], Image.new("RGB", bad))
    with pytest.raises(VlmquantError) as e:
        check_image_size(bad, "sample coco-3: imgs/strip.png")
    assert str(e.value).startswith("sample coco-3: imgs/strip.png: image is 6401x32 pixels, aspect ratio 200.03, over 200")
    with pytest.raises(VlmquantError, match=r"^x: image is 4100x20 pixels; sides shorter than 32"):
        check_image_size((4100, 20), "x")
    check_image_size((MIN_SIDE, MIN_SIDE), "x")
    with pytest.raises(VlmquantError, match="sides shorter"):
        check_image_size((100, MIN_SIDE - 1), "x")
