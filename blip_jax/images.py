"""Image loading and BLIP preprocessing, numerically equal to transformers' BlipImageProcessor.

Without torchvision (the case for this project) transformers 5.x resolves `BlipImageProcessor` to
`BlipImageProcessorPil` (PilBackend): RGB conversion, PIL resize (bicubic by default) of the uint8
image, rescale in float64 then cast to float32, normalize in float32. We reproduce those steps in
the same order and precision, but return NHWC (what the JAX models take) instead of NCHW.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """transformers' convert_to_rgb for PIL: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    # Note: PIL converts 16/32-bit integer modes (I;16, I) to 8 bit by clipping at 255, not by
    # scaling; transformers inherits that, and so do we to stay equal to it.
    return np.array(image.convert("RGB"))


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 array -> uint8 HxWx3 (transformers' numpy convert_to_rgb)."""
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            raise TypeError("float arrays are not raw images: pass uint8 HxWx3 images to load_image; "
                            "ImageProcessor treats float [B,H,W,3] arrays as already-preprocessed pixel_values")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"unsupported image array dtype {a.dtype}; expected uint8")
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"integer image array of dtype {a.dtype} has values outside [0, 255]; "
                             "convert it to uint8 (e.g. scale 16-bit data with >> 8) first")
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        hint = " (channels-first? transpose to HxWxC)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"image array must be HxW or HxWxC with C in (1, 3, 4), got shape {a.shape}{hint}")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"image path is not a file: {path}")
    try:
        im = Image.open(path)
        im.load()  # decode now so truncated / corrupt files fail here, naming the file
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e
    return im


def load_image(x: Any) -> np.ndarray:
    """Load a PIL image, uint8 array (HxW, HxWx1, HxWx3, HxWx4) or image file path as uint8 HxWx3 RGB.

    Any PIL mode is converted (L, P, RGBA, CMYK, I;16, ...). File paths follow transformers'
    `load_image`: EXIF orientation applied, then `convert("RGB")` (alpha dropped); PIL images and
    arrays with alpha follow the image processor and are composited onto white.
    """
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        im = _open(path)
        try:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot convert image file {path} to RGB: {e}") from e
    if isinstance(x, Image.Image):
        return _pil_to_rgb(x)
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return _array_to_rgb(np.asarray(x))
    raise TypeError(f"unsupported image input of type {type(x).__name__}: expected a PIL image, "
                    "a uint8 array or a file path")


def _normalize_size(size) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and "height" in size and "width" in size:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(f"size must be an int, (height, width) or {{'height', 'width'}}, got {size!r}")


def _resample(r) -> int:
    if isinstance(r, str):
        return int(Image.Resampling[r.upper()])
    return int(r)


@dataclass
class ImageProcessor:
    """BLIP image preprocessing; `__call__` returns float32 pixel_values in NHWC [B, H, W, 3]."""

    size: dict = field(default_factory=lambda: {"height": 384, "width": 384})
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    do_convert_rgb: bool = True

    def __post_init__(self):
        self.size = _normalize_size(self.size)
        self.resample = _resample(self.resample)
        # HF allows a scalar mean/std, broadcast over channels
        self.image_mean = [float(v) for v in np.broadcast_to(np.asarray(self.image_mean, dtype=np.float64), (3,))]
        self.image_std = [float(v) for v in np.broadcast_to(np.asarray(self.image_std, dtype=np.float64), (3,))]

    @classmethod
    def from_dir(cls, path: str | os.PathLike, image_size: int | None = None) -> "ImageProcessor":
        """Read preprocessor_config.json from a checkpoint directory, or the `image_processor` of a
        transformers 5 processor_config.json; if neither exists, BLIP's defaults at `image_size`
        (the model's vision tower; 384 when not given)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        if (path / CONFIG_NAME).is_file():
            with open(path / CONFIG_NAME, encoding="utf-8") as f:
                cfg = json.load(f)
        elif (path / PROCESSOR_CONFIG_NAME).is_file():
            with open(path / PROCESSOR_CONFIG_NAME, encoding="utf-8") as f:
                cfg = json.load(f).get("image_processor") or {}
        else:
            return cls() if image_size is None else cls(size={"height": image_size, "width": image_size})
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in cfg.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return {**asdict(self), "image_processor_type": "BlipImageProcessor"}

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    # ------------------------------------------------------------------ processing
    def preprocess_one(self, image: Any) -> np.ndarray:
        """One raw image (PIL / uint8 array / path) -> float32 [H, W, 3]."""
        if self.do_convert_rgb:
            a = load_image(image)
        else:  # no conversion: the input must already be 3-channel
            a = load_image(image) if isinstance(image, (str, os.PathLike)) else np.asarray(image)
            if a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"do_convert_rgb=False needs an HxWx3 image, got shape {a.shape}")
        h, w = self.size["height"], self.size["width"]
        if self.do_resize:  # PIL resize on the uint8 image, exactly as the PIL backend does
            a = np.array(Image.fromarray(a).resize((w, h), resample=self.resample))
        x = a
        if self.do_rescale:  # float64 multiply then float32, as transformers' rescale()
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(self.image_mean, dtype=x.dtype)) / np.asarray(self.image_std, dtype=x.dtype)
        return np.asarray(x, dtype=np.float32)

    def _check_pixels(self, x: np.ndarray) -> np.ndarray:
        """Validate an already-preprocessed float [B, H, W, 3] batch."""
        if x.shape[-1] != 3:
            if x.ndim in (3, 4) and x.shape[-3] == 3:
                raise ValueError(f"float pixel_values of shape {x.shape} look channels-first (NCHW); this "
                                 "library uses NHWC [B, H, W, 3]: transpose with x.transpose(0, 2, 3, 1)")
            raise ValueError(f"float pixel_values must be [B, H, W, 3] or [H, W, 3], got shape {x.shape}")
        h, w = self.size["height"], self.size["width"]
        if self.do_resize and x.shape[1:3] != (h, w):
            raise ValueError(f"pixel_values have spatial size {x.shape[1:3]}, expected {(h, w)}")
        return x.astype(np.float32, copy=False)

    def __call__(self, images: Any) -> np.ndarray:
        """images: one image or a list (PIL images, uint8 arrays, paths; uint8 [B,H,W,C] batches);
        float arrays [B,H,W,3] / [H,W,3] are taken as already-preprocessed pixel_values.
        Returns float32 pixel_values, NHWC [B, H, W, 3]."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        elif not isinstance(images, (list, tuple)):
            arr = np.asarray(images)
            if np.issubdtype(arr.dtype, np.floating):
                if arr.ndim not in (3, 4):
                    raise ValueError(f"float pixel_values must be [B, H, W, 3] or [H, W, 3], got shape {arr.shape}")
                return self._check_pixels(arr if arr.ndim == 4 else arr[None])
            images = list(arr) if arr.ndim == 4 else [arr]
        if len(images) == 0:
            raise ValueError("no images given")
        out = []
        for im in images:
            if not isinstance(im, (str, os.PathLike, Image.Image)) and np.issubdtype(np.asarray(im).dtype, np.floating):
                arr = np.asarray(im)
                if arr.ndim != 3:
                    raise ValueError(f"a float image in a list must be [H, W, 3], got shape {arr.shape}")
                out.append(self._check_pixels(arr[None])[0])
            else:
                out.append(self.preprocess_one(im))
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes after preprocessing {sorted(shapes)}; enable do_resize")
        return np.stack(out)
