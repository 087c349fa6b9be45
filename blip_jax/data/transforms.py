"""Training and evaluation transforms of the reference BLIP / LAVIS code, in NumPy + Pillow.

Images: `decode_image` turns a raw record's image (bytes, path or uint8 array) into uint8 HxWx3 RGB,
raising `BadRecord` for what cannot be used. `image_transform(kind, size)` builds the reference
pipelines (LAVIS `blip_image_train`, `blip2_image_train`, `blip_image_eval`; salesforce/BLIP
`create_dataset`): PIL bicubic random-resized crop, horizontal flip, BLIP's RandAugment, or a plain
bicubic resize; then /255 and normalisation, float32 NHWC (this library's layout).

Text: `pre_caption` and `pre_question` are the reference's cleaning (BLIP `data/utils.py`, LAVIS
`BlipCaptionProcessor` / `BlipQuestionProcessor`). The reference has no answer cleaning for VQA
training (answers are used as written), so there is no `pre_answer`.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from blip_jax.data.randaugment import RandomAugment
from blip_jax.data.records import BadRecord
from blip_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# ============================================================================= decoding
_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def decode_image(data) -> np.ndarray:
    """Encoded bytes, an image file path or a uint8 array -> uint8 [H, W, 3] RGB.

    Follows the reference's `Image.open(path).convert("RGB")`: alpha is dropped (not composited),
    palettes and CMYK go through PIL, EXIF orientation is not applied. The one deliberate difference:
    16/32-bit integer images (PIL modes I;16*, I) are scaled to 8 bit by keeping the high byte
    (value >> 8, values of mode I clipped to [0, 65535] first), because PIL's convert clips them at
    255 and turns almost every pixel of a real 16-bit image white.

    Raises BadRecord: missing_file, empty_file, corrupt_image (undecodable or truncated; the image is
    fully decoded here, PIL's LOAD_TRUNCATED_IMAGES is left False), zero_size_image.
    """
    return decode_image_with_mode(data)[0]


def decode_image_with_mode(data) -> tuple[np.ndarray, str]:
    """`decode_image`, also returning the source's PIL mode ("RGB", "L", "P", "I;16", ...), or "array"
    for array input, so callers can count which conversions happened."""
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data), "array"
    if isinstance(data, Image.Image):
        return _pil_to_rgb(data, "PIL image"), data.mode
    if isinstance(data, (str, os.PathLike)):
        name = os.fspath(data)
        encoded = _read_file(name)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        encoded = bytes(data)
        name = f"<{len(encoded)} bytes>"
    else:
        raise TypeError(f"image must be bytes, a file path or a uint8 array, not {type(data).__name__}")
    if not encoded:
        raise BadRecord("empty_file", name)
    image = _open_fully(encoded, name)
    return _pil_to_rgb(image, name), image.mode


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadRecord("missing_file", path) from None
    except OSError as e:  # a directory, no permission, an I/O error: no image can be had from it
        raise BadRecord("missing_file", f"{path}: {e.strerror or e}") from None


MAX_IMAGE_PIXELS = 89_478_485  # PIL's own bound (it only warns up to twice this): above it, a decompression bomb


def _open_fully(encoded: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(encoded))  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise BadRecord("image_too_large", f"{name}: {image.width}x{image.height} pixels (at most "
                            f"{MAX_IMAGE_PIXELS}): a decompression bomb, or a scan no model input needs")
        image.load()  # decode every pixel now: truncated data fails here, not later in a transform
    except BadRecord:
        raise
    except Image.DecompressionBombError as e:
        raise BadRecord("image_too_large", f"{name}: {e}") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, EOFError, ... on bad data
        if _header_says_zero_size(encoded):
            raise BadRecord("zero_size_image", name) from None
        raise BadRecord("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise BadRecord("zero_size_image", f"{name}: {image.width}x{image.height}")
    return image


def _header_says_zero_size(encoded: bytes) -> bool:
    """PIL refuses to open a PNG or GIF whose header gives width or height 0; read the header so such
    a file is counted as zero_size_image rather than corrupt_image."""
    if encoded[:8] == b"\x89PNG\r\n\x1a\n" and encoded[12:16] == b"IHDR" and len(encoded) >= 24:
        width, height = struct.unpack(">II", encoded[16:24])
    elif encoded[:6] in (b"GIF87a", b"GIF89a") and len(encoded) >= 10:
        width, height = struct.unpack("<HH", encoded[6:10])
    else:
        return False
    return width == 0 or height == 0


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise BadRecord("zero_size_image", f"{name}: {image.width}x{image.height}")
    if image.mode in _INTEGER_MODES:  # see decode_image: scale instead of PIL's clip at 255
        return _gray_to_rgb(_high_byte(np.array(image)))
    try:
        with warnings.catch_warnings():
            # a palette with per-entry transparency warns on convert("RGB"); dropping it is intended
            warnings.simplefilter("ignore", UserWarning)
            return np.array(image.convert("RGB"))
    except Exception as e:  # a mode PIL cannot convert to RGB
        raise BadRecord("corrupt_image", f"{name}: cannot convert mode {image.mode} to RGB: {e}") from None


def _high_byte(values: np.ndarray) -> np.ndarray:
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (or uint16, scaled >> 8) HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) -> uint8 HxWx3."""
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise BadRecord("corrupt_image", f"image array of shape {a.shape}, expected HxW or HxWxC, C in 1/3/4")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise BadRecord("zero_size_image", f"image array of shape {a.shape}")
    if a.dtype == np.uint16:
        a = _high_byte(a)
    elif a.dtype != np.uint8:
        raise BadRecord("corrupt_image", f"image array of dtype {a.dtype}, expected uint8")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return _gray_to_rgb(a[..., 0])
    return np.ascontiguousarray(a[..., :3])


# ============================================================================= image transforms
def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w).

    Up to 10 tries of an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`;
    the first box that fits is placed uniformly. If none fits, the centre crop of the whole image
    clamped to `ratio`. Same algorithm; the numbers come from `rng` (torch draws float32 from its own
    generator), so the distribution is the reference's, the individual draws are not.
    """
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ValueError(f"scale and ratio must be (min, max), got scale={scale}, ratio={ratio}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _size_hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _as_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def resized_crop(image, box: tuple[int, int, int, int], size, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """Crop `box` = (top, left, h, w) and resize to `size` (int or (h, w)) with PIL, as torchvision's
    resized_crop does on PIL images: `img.crop((left, top, left + w, top + h)).resize((W, H))`."""
    top, left, h, w = box
    out_h, out_w = _size_hw(size)
    cropped = _as_pil(image).crop((left, top, left + w, top + h))
    return np.array(cropped.resize((out_w, out_h), resample=resample))


def resize(image, size, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """PIL resize to `size` (int: square), as torchvision `Resize((size, size))` on a PIL image."""
    out_h, out_w = _size_hw(size)
    return np.array(_as_pil(image).resize((out_w, out_h), resample=resample))


def horizontal_flip(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """torchvision RandomHorizontalFlip: flip when a uniform draw is < p."""
    return horizontal_flip(image) if rng.random() < p else image


def to_float(image: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 HxWx3 -> float32 (x / 255 - mean) / std, HxWx3.

    x / 255 as float64 rounded to float32 equals torch's float32 x / 255 for every uint8 value, and is
    what blip_jax.images.ImageProcessor does; the normalisation is float32, as torch's Normalize.
    """
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


TRANSFORM_KINDS = ("blip_train", "blip2_train", "eval")


@dataclass(frozen=True)
class ImageTransform:
    """uint8 HxWx3 image (+ rng for the training kinds) -> float32 [size, size, 3].

    blip_train  = LAVIS blip_image_train / BLIP transform_train: RandomResizedCrop(size, scale,
                  bicubic) -> RandomHorizontalFlip -> RandomAugment(2, 5) -> ToTensor -> Normalize
    blip2_train = LAVIS blip2_image_train: the same without RandomAugment
    eval        = LAVIS blip_image_eval / BLIP transform_test: Resize((size, size), bicubic) -> ...
    A frozen dataclass of plain values, so it pickles into grain worker processes.
    """

    kind: str
    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)
    randaugment: RandomAugment | None = None

    def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}; decode it first")
        if self.kind == "eval":
            return to_float(resize(image, self.size), self.mean, self.std)
        if rng is None:
            raise ValueError(f"the {self.kind!r} transform is random: pass a np.random.Generator")
        box = random_resized_crop_params(rng, image.shape[0], image.shape[1], self.scale)
        pixels = random_horizontal_flip(resized_crop(image, box, self.size), rng)
        if self.randaugment is not None:
            pixels = self.randaugment(pixels, rng)
        return to_float(pixels, self.mean, self.std)


def image_transform(kind: str, size: int, *, scale=(0.5, 1.0), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    fix_autocontrast_overflow: bool = False) -> ImageTransform:
    """Build a reference transform: kind in TRANSFORM_KINDS, output float32 [size, size, 3].

    `scale` is the crop's area range (LAVIS min_scale, max_scale; training kinds only).
    `fix_autocontrast_overflow` repairs the reference RandAugment's AutoContrast bug (see
    blip_jax.data.randaugment.autocontrast); off by default to train as the reference did.
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown image transform kind {kind!r}; valid kinds: {', '.join(TRANSFORM_KINDS)}")
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    randaugment = RandomAugment(fix_autocontrast_overflow=fix_autocontrast_overflow) if kind == "blip_train" else None
    return ImageTransform(kind=kind, size=int(size), scale=(float(scale[0]), float(scale[1])),
                          mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                          randaugment=randaugment)


# ============================================================================= text
# The reference's punctuation class: . ! " ( ) * # : ; ~  (commas, apostrophes and ? are kept).
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


MAX_TEXT_CHARS = 65_536  # longer than any real caption, question or instruction: refused, not tokenized
_TEXT_FIELDS = ("caption", "question", "instruction", "output", "text")  # one string each (text: NLVR2's)
_TEXT_LISTS = ("captions", "answers", "choices")  # lists of strings


def _require_text(text, what: str) -> str:
    """The one text rule: a non-empty string of at most MAX_TEXT_CHARS characters that is valid
    Unicode (a lone surrogate, from a JSON escape or from undecodable bytes read with
    surrogateescape, cannot be tokenized)."""
    if not isinstance(text, str):
        raise BadRecord("bad_text", f"{what} is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadRecord("bad_text", f"{what} is empty or whitespace only")
    if len(text) > MAX_TEXT_CHARS:
        raise BadRecord("bad_text", f"{what} has {len(text)} characters (at most {MAX_TEXT_CHARS})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord("bad_text", f"{what} is not valid Unicode ({e.reason} at character {e.start}: "
                        "a lone surrogate, or bytes that are not UTF-8)") from None
    return text


MALFORMED = "malformed"  # a source's marker for a record it could not parse (the detail as value)


def check_record(record: dict) -> dict:
    """The checks every record passes before its image is decoded (training's transform and
    `blip-jax data check` both start here): a source's parse failure (`MALFORMED`) and every text
    by `_require_text`. Returns the record."""
    if MALFORMED in record:
        raise BadRecord("malformed_json", str(record[MALFORMED]))
    for key in _TEXT_FIELDS:
        if key in record:
            _require_text(record[key], key)
    for key in _TEXT_LISTS:
        if key in record:
            values = record[key]
            if not isinstance(values, (list, tuple)):
                raise BadRecord("bad_text", f"{key} is {type(values).__name__}, not a list of strings")
            for i, value in enumerate(values):
                _require_text(value, f"{key}[{i}]")
    return record


def _first_words(text: str, max_words: int) -> str:
    words = text.split(" ")  # the reference splits on single spaces, not on any whitespace
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption, max_words: int = 50, prompt: str = "") -> str:
    """Reference caption cleaning: lower-case; each of . ! " ( ) * # : ; ~ becomes a space; runs of 2+
    whitespace characters become one space (a single tab or newline stays); strip a trailing newline,
    then spaces; keep the first `max_words` space-separated words; prefix `prompt`.

    Raises BadRecord("bad_text") for a non-string, empty or whitespace-only caption, or one that is
    empty after cleaning (e.g. only punctuation).
    """
    caption = _require_text(caption, "caption")
    cleaned = _PUNCTUATION.sub(" ", caption.lower())
    cleaned = _WHITESPACE_RUN.sub(" ", cleaned).rstrip("\n").strip(" ")
    cleaned = _first_words(cleaned, max_words)
    if not cleaned.strip():
        raise BadRecord("bad_text", f"caption {caption!r} is empty after cleaning")
    return prompt + cleaned


def pre_question(question, max_words: int = 50) -> str:
    """Reference question cleaning: lower-case; remove (not replace) . ! " ( ) * # : ; ~; strip
    trailing spaces; keep the first `max_words` space-separated words. Whitespace is not collapsed
    and leading spaces are kept, as in the reference.

    Raises BadRecord("bad_text") for a non-string, empty or whitespace-only question, or one that is
    empty after cleaning.
    """
    question = _require_text(question, "question")
    cleaned = _PUNCTUATION.sub("", question.lower()).rstrip(" ")
    cleaned = _first_words(cleaned, max_words)
    if not cleaned.strip():
        raise BadRecord("bad_text", f"question {question!r} is empty after cleaning")
    return cleaned
