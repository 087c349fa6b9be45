"""Reference BLIP/LAVIS transforms: image decoding, crop/flip/resize/normalise, RandAugment, text cleaning.

Oracles are direct Pillow/NumPy computations of the reference definitions; the OpenCV-based RandAugment
ops are also pinned to hashes of the reference functions' outputs under opencv-python-headless 4.5.5.64
(the version LAVIS pins; 4.14 gives the same bytes).
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageFilter, ImageOps

from blip_jax.data import randaugment as ra
from blip_jax.data.records import BadRecord
from blip_jax.data.transforms import (TRANSFORM_KINDS, ImageTransform, decode_image, decode_image_with_mode,
                                      image_transform, pre_caption, pre_question, random_horizontal_flip,
                                      random_resized_crop_params, resize, resized_crop, to_float)
from blip_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor


def pattern(h, w):
    """A deterministic, busy uint8 HxWx3 image."""
    yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((xx * 13 + yy * 7 + cc * 50 + (xx * yy) % 17 * 9) % 256).astype(np.uint8)


def smooth(h, w):
    """A slowly varying image, where bilinear resamplers of different precision agree closely."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 4 + yy, yy * 5 + 20, (xx + yy) * 2 + 10], -1).clip(0, 255).astype(np.uint8)


def noise(h, w, seed=0, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


# ============================================================================= decoding
def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _palette_image():
    im = Image.fromarray(noise(6, 5, seed=3)[..., 0] % 4, "L").convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (3 * 252))
    return im


def _png_16bit_rgb(path, rgb16):
    """A minimal 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _reference_rgb(path):
    """The reference loader: Image.open(path).convert("RGB")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("LA", "PNG"),
                                      ("RGBA", "PNG"), ("P", "PNG"), ("P+int transparency", "PNG"),
                                      ("P+bytes transparency", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")])
def test_decode_follows_reference_convert_rgb(tmp_path, mode, fmt):
    rgba = np.concatenate([noise(6, 5, seed=1), noise(6, 5, seed=2)[..., :1]], -1)
    if mode.startswith("P"):
        im = _palette_image()
        if mode == "P+int transparency":
            im.info["transparency"] = 1
        elif mode == "P+bytes transparency":
            im.info["transparency"] = bytes([0, 128, 255])
    elif mode == "CMYK":
        im = Image.fromarray(rgba, "RGBA").convert("CMYK")
    else:
        im = Image.fromarray(rgba, "RGBA").convert(mode)
    path = _save(tmp_path, im, f"img.{fmt.lower()}", format=fmt)
    expected = _reference_rgb(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # conversions must not spam worker logs
        out, source_mode = decode_image_with_mode(path)
        from_bytes = decode_image(path.read_bytes())
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(from_bytes, expected)
    assert source_mode == Image.open(path).mode
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_drops_alpha_instead_of_compositing(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red: the reference keeps red, a white composite would not
    out = decode_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"))
    np.testing.assert_array_equal(out, np.broadcast_to([200, 0, 0], (2, 2, 3)))


def test_decode_16bit_gray_png_scales_high_byte(tmp_path):
    values = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000 + 7)
    path = _save(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(path).mode == "I;16"
    out, mode = decode_image_with_mode(path)
    assert mode == "I;16"
    np.testing.assert_array_equal(out, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, -1))
    # why we deviate: PIL's convert clips at 255, whitening nearly every pixel
    assert (_reference_rgb(path) == 255).mean() > 0.9


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_decode_16bit_tiff_modes(tmp_path, mode):
    values = np.arange(12).reshape(3, 4) * 5000
    if mode == "I":
        values[0, 0], values[0, 1] = -5, 70000  # outside 16 bits: clipped
        im = Image.fromarray(values.astype(np.int32))
    else:
        im = Image.frombytes("I;16B", (4, 3), values.astype(">u2").tobytes())
    path = _save(tmp_path, im, "x.tiff")
    out, source_mode = decode_image_with_mode(path)
    assert source_mode == mode
    expected = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_decode_16bit_rgb_png(tmp_path):
    rgb16 = (np.arange(36, dtype=np.uint16).reshape(3, 4, 3) * 1800 + 33)
    out = decode_image(_png_16bit_rgb(tmp_path / "rgb16.png", rgb16))
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_decode_does_not_apply_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, Image.fromarray(noise(4, 7)), "exif.jpg", exif=exif, quality=95)
    out = decode_image(path)
    assert out.shape == (4, 7, 3)
    np.testing.assert_array_equal(out, np.array(Image.open(path)))


def test_decode_arrays():
    rgb = noise(3, 4)
    np.testing.assert_array_equal(decode_image(rgb), rgb)
    np.testing.assert_array_equal(decode_image(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1))
    rgba = np.concatenate([rgb, np.zeros((3, 4, 1), np.uint8)], -1)
    np.testing.assert_array_equal(decode_image(rgba), rgb)
    np.testing.assert_array_equal(decode_image(rgb.astype(np.uint16) * 256 + 255), rgb)
    assert decode_image_with_mode(rgb)[1] == "array"


def _reason(data):
    with pytest.raises(BadRecord) as info:
        decode_image(data)
    return info.value.reason


def test_decode_bad_records(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(jpeg, "JPEG", quality=90)
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    (tmp_path / "truncated.jpg").write_bytes(truncated)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all" * 3)
    ihdr = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    zero_png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00" * 12)

    assert _reason(tmp_path / "truncated.jpg") == "corrupt_image"
    assert _reason(truncated) == "corrupt_image"
    assert _reason(tmp_path / "empty.jpg") == "empty_file"
    assert _reason(b"") == "empty_file"
    assert _reason(tmp_path / "garbage.jpg") == "corrupt_image"
    assert _reason(str(tmp_path / "nowhere.jpg")) == "missing_file"
    assert _reason(tmp_path) == "missing_file"  # a directory
    assert _reason(zero_png) == "zero_size_image"
    assert _reason(np.zeros((0, 4, 3), np.uint8)) == "zero_size_image"
    assert _reason(np.zeros((4, 4, 3), np.float32)) == "corrupt_image"
    assert _reason(np.zeros((3, 4, 4, 2), np.uint8)) == "corrupt_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(TypeError):
        decode_image(12)


# ============================================================================= crop / flip / resize / normalise
def torchvision_get_params(rng, height, width, scale, ratio):
    """RandomResizedCrop.get_params as torchvision writes it, drawing from a NumPy generator."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _attempt in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.integers(0, height - h + 1)
            j = rng.integers(0, width - w + 1)
            return int(i), int(j), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(480, 640), (37, 23), (10, 1000), (1000, 10), (1, 1), (100, 100)])
@pytest.mark.parametrize("scale", [(0.5, 1.0), (0.08, 1.0)])
def test_random_resized_crop_params_match_torchvision(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    for seed in range(40):
        mine_rng, oracle_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        box = random_resized_crop_params(mine_rng, height, width, scale, ratio)
        assert box == torchvision_get_params(oracle_rng, height, width, scale, ratio)
        assert mine_rng.random() == oracle_rng.random()  # the same number of draws
        top, left, h, w = box
        assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width


def test_random_resized_crop_fallbacks():
    rng = np.random.default_rng(0)
    # too wide for any 4/3 box of half the area: centre crop of full height at ratio 4/3
    assert random_resized_crop_params(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert random_resized_crop_params(rng, 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)

    class Extremes:  # every try asks for the whole area at ratio 4/3, which never fits a square
        def uniform(self, low, high):
            return high

    assert random_resized_crop_params(Extremes(), 50, 50) == (0, 0, 50, 50)
    with pytest.raises(ValueError):
        random_resized_crop_params(rng, 10, 10, scale=(1.0, 0.5))


@pytest.mark.parametrize("size", [16, (9, 13)])
def test_resized_crop_is_pil_crop_then_bicubic_resize(size):
    image = noise(40, 30)
    top, left, h, w = 5, 3, 21, 17
    out_h, out_w = (size, size) if isinstance(size, int) else size
    expected = np.array(Image.fromarray(image).crop((left, top, left + w, top + h))
                        .resize((out_w, out_h), Image.BICUBIC))
    np.testing.assert_array_equal(resized_crop(image, (top, left, h, w), size), expected)


def test_horizontal_flip():
    image = noise(4, 6)
    flips = [not np.array_equal(random_horizontal_flip(image, np.random.default_rng(s)), image) for s in range(200)]
    assert 60 < sum(flips) < 140
    flipped = next(random_horizontal_flip(image, np.random.default_rng(s)) for s in range(200) if flips[s])
    np.testing.assert_array_equal(flipped, np.array(Image.fromarray(image).transpose(Image.FLIP_LEFT_RIGHT)))


def test_to_float_matches_numpy_and_torch_order():
    image = noise(5, 7)
    out = to_float(image)
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    exact = (image / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(out, exact, atol=1e-6)
    # ToTensor (float32 x / 255) then Normalize in float32, bit for bit
    torch_like = ((image.astype(np.float32) / np.float32(255)) - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    np.testing.assert_array_equal(out, torch_like)


@pytest.mark.parametrize("size", [224, 384])
def test_eval_transform_equals_image_processor(size):
    image = noise(300, 410, seed=5)
    out = image_transform("eval", size)(image)
    np.testing.assert_array_equal(out, ImageProcessor(size=size)(image)[0])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = image_transform("eval", size, mean=mean, std=std)(image)
    np.testing.assert_array_equal(out, ImageProcessor(size=size, image_mean=list(mean), image_std=list(std))(image)[0])
    np.testing.assert_array_equal(resize(image, size), np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC)))


# ============================================================================= RandAugment ops
# sha256[:32] of the reference functions' outputs (opencv-python-headless 4.5.5.64) on pattern(48, 64)
REFERENCE_HASHES = {
    "shear_x 0.15": "aeb5133e68f9ae69c098f695f4e9f30a",
    "shear_x -0.15": "6989af3962dbe27fb9e3bc415d7bbd50",
    "shear_y 0.15": "f81e700e3bc0287298aef7577e59eac1",
    "shear_y -0.15": "fe094cca532a329891c7e1263f4497de",
    "translate_x 5": "eed17a176599278818002ed54f01059e",
    "translate_x -2.5": "74ec761c60345bf89916e37b2804af62",
    "translate_y -5": "9261818829d834319881a47ddb7b339f",
    "translate_y 3.3": "28719925ce7ae8ccee6e7c0e7d8a8db3",
    "rotate 15": "6e9815e7ee90c6964ee21e8f23dd3a75",
    "rotate -15": "b7386142c157759e44a98c500def349b",
    "sharpness 0.55": "16af5c8ee6e83b1e701b16afc3427468",
    "sharpness 0.0": "36097816e0580b1b41d1b68ae442b46b",
    "autocontrast lifted": "a27a50c72e45c4f5a44249d2913d9c56",
    "equalize": "77b508e898915e1eda94d596e37d63d9",
}
# the reference rotate_func(pattern(5, 6), 15, fill 128), channel 0, under the same OpenCV
REFERENCE_ROTATE_SMALL = [[91, 69, 52, 51, 77, 115], [10, 30, 54, 84, 117, 141], [14, 42, 74, 112, 153, 192],
                          [19, 50, 90, 135, 185, 177], [52, 54, 102, 155, 186, 150]]


def _hash(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def test_ops_match_reference_opencv_outputs():
    img, fill = pattern(48, 64), ra.FILL
    outputs = {
        "shear_x 0.15": ra.shear_x(img, 0.15, fill), "shear_x -0.15": ra.shear_x(img, -0.15, fill),
        "shear_y 0.15": ra.shear_y(img, 0.15, fill), "shear_y -0.15": ra.shear_y(img, -0.15, fill),
        "translate_x 5": ra.translate_x(img, 5.0, fill), "translate_x -2.5": ra.translate_x(img, -2.5, fill),
        "translate_y -5": ra.translate_y(img, -5.0, fill), "translate_y 3.3": ra.translate_y(img, 3.3, fill),
        "rotate 15": ra.rotate(img, 15.0, fill), "rotate -15": ra.rotate(img, -15.0, fill),
        "sharpness 0.55": ra.sharpness(img, 0.55), "sharpness 0.0": ra.sharpness(img, 0.0),
        "autocontrast lifted": ra.autocontrast(img // 2 + 40), "equalize": ra.equalize(img),
    }
    assert {k: _hash(v) for k, v in outputs.items()} == REFERENCE_HASHES
    assert ra.rotate(pattern(5, 6), 15.0, fill)[..., 0].tolist() == REFERENCE_ROTATE_SMALL


def reference_autocontrast(img):
    """The reference's autocontrast_func (cutoff 0), uint8 scalars and all."""
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        high, low = ch.max(), ch.min()
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            with np.errstate(over="ignore"):
                offset = -low * scale
            table = np.arange(256) * scale + offset
            table[table < 0] = 0
            table[table > 255] = 255
        out[..., c] = table.clip(0, 255).astype(np.uint8)[ch]
    return out


def reference_equalize(img):
    """The reference's equalize_func, with its float32 histogram."""
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
        step = np.sum(hist[hist != 0][:-1]) // 255
        if step == 0:
            out[..., c] = ch
            continue
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        out[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    return out


IMAGES = {"noise": noise(23, 31, seed=4), "low contrast": noise(20, 17, seed=5, low=40, high=200),
          "pattern": pattern(16, 24), "flat": np.full((5, 6, 3), 77, np.uint8), "one pixel": noise(1, 1, seed=6),
          "zero low": np.concatenate([np.zeros((1, 9, 3), np.uint8), noise(8, 9, seed=7, low=30, high=220)])}


@pytest.mark.parametrize("name", IMAGES)
def test_autocontrast_reference_and_fixed(name):
    img = IMAGES[name]
    np.testing.assert_array_equal(ra.autocontrast(img), reference_autocontrast(img))
    np.testing.assert_array_equal(ra.autocontrast(img, fix_overflow=True),
                                  np.array(ImageOps.autocontrast(Image.fromarray(img))))


def test_autocontrast_reference_overflow_whitens_lifted_channels():
    img = noise(10, 10, low=30, high=200)
    assert (ra.autocontrast(img) == 255).all()  # LAVIS issue #434: what the reference really does
    zero_low = IMAGES["zero low"]  # min 0 in every channel: no overflow, equal to PIL
    np.testing.assert_array_equal(ra.autocontrast(zero_low), np.array(ImageOps.autocontrast(Image.fromarray(zero_low))))


@pytest.mark.parametrize("name", IMAGES)
def test_equalize_matches_reference_and_pil(name):
    img = IMAGES[name]
    np.testing.assert_array_equal(ra.equalize(img), reference_equalize(img))
    np.testing.assert_array_equal(ra.equalize(img), np.array(ImageOps.equalize(Image.fromarray(img))))


@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.37, 1.9])
def test_brightness(factor):
    img = IMAGES["noise"]
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ra.brightness(img, factor), table[img])


def reference_smooth(img):
    """[[1,1,1],[1,5,1],[1,1,1]] / 13 with reflect-101 borders, rounded to nearest."""
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    padded = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    total = sum(kernel[dy, dx] * padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return np.floor(total / 13 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.55, 1.0])
@pytest.mark.parametrize("name", ["noise", "pattern", "one pixel"])
def test_sharpness(name, factor):
    img = IMAGES[name]
    degenerate = reference_smooth(img)
    if factor == 0.0:
        expected = degenerate
    else:
        expected = img.astype(np.float32)
        inner = degenerate[1:-1, 1:-1].astype(np.float32)
        expected[1:-1, 1:-1] = inner + np.float32(factor) * (expected[1:-1, 1:-1] - inner)
        expected = expected.astype(np.uint8)
    np.testing.assert_array_equal(ra.sharpness(img, factor), expected)
    # interior smoothing is PIL's SMOOTH filter
    pil = np.array(Image.fromarray(img).filter(ImageFilter.SMOOTH))
    np.testing.assert_array_equal(degenerate[1:-1, 1:-1], pil[1:-1, 1:-1])


def float_warp(img, matrix, fill):
    """Exact-coordinate bilinear cv2-style warp (pixel centres at integers, neighbours outside = fill)."""
    h, w = img.shape[:2]
    inverse = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
    sy = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def pixel(y, x):
        inside = ((0 <= y) & (y < h) & (0 <= x) & (x < w))[..., None]
        return np.where(inside, img[y.clip(0, h - 1), x.clip(0, w - 1)], np.asarray(fill, np.float64))

    value = ((1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1))
             + fy * ((1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)))
    return value


@pytest.mark.parametrize("op,amount", [("shear_x", 0.15), ("shear_y", -0.15), ("translate_x", 2.5),
                                       ("translate_y", -3.3), ("rotate", 15.0), ("rotate", -30.0)])
def test_affine_ops_are_bilinear_warps(op, amount):
    img, fill = smooth(40, 50), ra.FILL
    h, w = img.shape[:2]
    matrix = {"shear_x": [[1, np.float32(amount), 0], [0, 1, 0]], "shear_y": [[1, 0, 0], [np.float32(amount), 1, 0]],
              "translate_x": [[1, 0, -amount], [0, 1, 0]], "translate_y": [[1, 0, 0], [0, 1, -amount]]}.get(op)
    if op == "rotate":  # cv2.getRotationMatrix2D((w/2, h/2), degrees, 1)
        a, b = math.cos(math.radians(amount)), math.sin(math.radians(amount))
        matrix = [[a, b, (1 - a) * w / 2 - b * h / 2], [-b, a, b * w / 2 + (1 - a) * h / 2]]
    out = getattr(ra, op)(img, amount, fill)
    assert out.dtype == np.uint8 and out.shape == img.shape
    # OpenCV rounds source positions to 1/32 pixel (an error of at most 1/64 of the neighbour step per
    # axis, under 2 levels even at the fill edge of this image) and the result to an integer (0.5)
    assert np.abs(out.astype(float) - float_warp(img, matrix, fill)).max() <= 2.5


def test_integer_translation_is_a_shift_with_fill():
    img = pattern(12, 15)
    out = ra.translate_x(img, 5.0, ra.FILL)
    np.testing.assert_array_equal(out[:, :-5], img[:, 5:])
    assert (out[:, -5:] == 128).all()
    out = ra.translate_y(img, -5.0, ra.FILL)
    np.testing.assert_array_equal(out[5:], img[:-5])
    assert (out[:5] == 128).all()


def test_level_mappings_at_blip_magnitude():
    assert ra.enhance_factor(5) == 1.0  # Brightness and Sharpness are identities at M=5
    assert ra.shear_amount(5) == 0.15
    assert ra.translate_pixels(5) == 5.0
    assert ra.rotate_degrees(5) == 15.0
    img = IMAGES["noise"]
    np.testing.assert_array_equal(ra.brightness(img, ra.enhance_factor(5)), img)
    np.testing.assert_array_equal(ra.sharpness(img, ra.enhance_factor(5)), img)


# ============================================================================= RandomAugment
class ScriptedRng:
    """Plays back fixed draws and fails if the code draws more than scripted."""

    def __init__(self, choices, uniforms):
        self.choices, self.uniforms = list(choices), list(uniforms)

    def integers(self, high, size):
        assert len(self.choices) == size
        return np.array(self.choices)

    def random(self):
        return self.uniforms.pop(0)


def test_random_augment_draw_order_and_signs():
    img = pattern(20, 24)
    ops = ra.BLIP_OPS
    aug = ra.RandomAugment()
    # TranslateX applied (0.3 <= 0.5), its sign draw 0.7 > 0.5 -> negative; Rotate applied, 0.2 < 0.5 -> negative
    rng = ScriptedRng([ops.index("TranslateX"), ops.index("Rotate")], [0.3, 0.7, 0.4, 0.2])
    expected = ra.rotate(ra.translate_x(img, -5.0, ra.FILL), -15.0, ra.FILL)
    np.testing.assert_array_equal(aug(img, rng), expected)
    assert rng.uniforms == []
    # skipped ops draw no sign; positive signs
    rng = ScriptedRng([ops.index("ShearY"), ops.index("Rotate")], [0.51, 0.5, 0.6])
    np.testing.assert_array_equal(aug(img, rng), ra.rotate(img, 15.0, ra.FILL))
    rng = ScriptedRng([ops.index("ShearX"), ops.index("Equalize")], [0.1, 0.5, 0.0])
    np.testing.assert_array_equal(aug(img, rng), ra.equalize(ra.shear_x(img, 0.15, ra.FILL)))


def test_random_augment_identity_determinism_and_types():
    img = noise(32, 32, seed=9)
    identity = ra.RandomAugment(ops=("Identity",))
    np.testing.assert_array_equal(identity(img, np.random.default_rng(0)), img)
    aug = ra.RandomAugment()
    outputs = [aug(img, np.random.default_rng(seed)) for seed in range(12)]
    for seed, out in enumerate(outputs):
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, aug(img, np.random.default_rng(seed)))
    assert len({o.tobytes() for o in outputs}) > 3
    assert pickle.loads(pickle.dumps(aug)) == aug
    with pytest.raises(ValueError):
        ra.RandomAugment(ops=("Solarize",))


# ============================================================================= factory
def test_image_transform_kinds_and_pickling():
    image = noise(50, 70, seed=11)
    for kind in TRANSFORM_KINDS:
        transform = image_transform(kind, 32)
        clone = pickle.loads(pickle.dumps(transform))
        assert clone == transform and isinstance(clone, ImageTransform)
        out = transform(image, np.random.default_rng(3))
        assert out.dtype == np.float32 and out.shape == (32, 32, 3)
        np.testing.assert_array_equal(out, clone(image, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="blip_train.*blip2_train.*eval"):
        image_transform("imagenet", 32)
    with pytest.raises(ValueError, match="Generator"):
        image_transform("blip_train", 32)(image)


def test_train_transforms_compose_reference_steps():
    image = noise(50, 70, seed=12)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        box = random_resized_crop_params(rng, 50, 70, (0.5, 1.0))
        cropped = random_horizontal_flip(resized_crop(image, box, 24), rng)
        blip2 = image_transform("blip2_train", 24)(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(blip2, to_float(cropped))
        augmented = ra.RandomAugment()(cropped, rng)
        blip = image_transform("blip_train", 24)(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(blip, to_float(augmented))


# ============================================================================= text
_REF_PUNCT = r"([.!\"()*#:;~])"


def reference_pre_caption(caption, max_words=50):
    caption = re.sub(_REF_PUNCT, " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def reference_pre_question(question, max_words=50):
    question = re.sub(_REF_PUNCT, "", question.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


TRICKY = ["A man riding a horse.", "  Two DOGS!!  playing (in) the *snow*  ", "What's this? It's a cat; really~",
          "tabs\tand\nnewlines\n", "multi\n\nline caption\n", "#hashtag: #blessed", "e.g. U.S.A. 3.5 m",
          "\"quoted\" words, commas, and 'apostrophes'", "Ünïcödé ÇAPS — dash", "trailing spaces   ",
          " x", "a\tb", "one.two", "word " * 60, "x. " * 55, "end\n", "?"]


@pytest.mark.parametrize("text", TRICKY)
def test_pre_caption_and_pre_question_match_reference(text):
    assert pre_caption(text) == reference_pre_caption(text)
    assert pre_caption(text, max_words=3, prompt="a picture of ") == "a picture of " + reference_pre_caption(text, 3)
    assert pre_question(text) == reference_pre_question(text)
    assert pre_question(text, max_words=4) == reference_pre_question(text, 4)


def test_text_cleaning_examples():
    assert pre_caption("A man.  riding~a \"horse\"!", prompt="a picture of ") == "a picture of a man riding a horse"
    assert pre_caption("word " * 60).split(" ") == ["word"] * 50
    assert pre_question("  What is (this)?  ") == "  what is this?"
    assert pre_question("Is it #1: yes.") == "is it 1 yes"


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["list"], "", "   ", "\n\t", "...", "~!()", " . "])
def test_bad_text_raises(bad):
    for clean in (pre_caption, pre_question):
        with pytest.raises(BadRecord) as info:
            clean(bad)
        assert info.value.reason == "bad_text"
