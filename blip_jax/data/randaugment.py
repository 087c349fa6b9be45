"""BLIP's RandAugment, `RandomAugment(2, 5)`, with the reference's numbers in NumPy alone.

The reference (salesforce/BLIP `transform/randaugment.py`, the same file as LAVIS
`lavis/processors/randaugment.py` and ALBEF's) works on uint8 HxWx3 arrays with NumPy and OpenCV. Each
op below reproduces its reference function value for value; the OpenCV calls (`filter2D`,
`warpAffine`) are rebuilt from OpenCV's own integer arithmetic, so no cv2 is needed. Randomness comes
only from the `np.random.Generator` passed in, drawn in the reference's order (op choice, apply coin,
sign coin).

At BLIP's magnitude 5 the enhance factor is exactly 1.0, so Brightness and Sharpness leave the image
unchanged there; they still follow the reference at other magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_LEVEL = 10
TRANSLATE_CONST = 10  # pixels of translation at MAX_LEVEL
FILL = (128, 128, 128)  # the reference's replace_value for pixels moved in from outside
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


# ----------------------------------------------------------------------------- colour ops
def identity(img: np.ndarray) -> np.ndarray:
    return img


def autocontrast(img: np.ndarray, *, fix_overflow: bool = False) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255] (the reference's autocontrast_func, cutoff 0).

    The reference computes the offset as `-low * scale` with `low` a NumPy uint8 scalar, so `-low`
    wraps to 256 - low: any channel whose minimum is above 0 comes out all 255 (LAVIS issue #434,
    ALBEF issue #134). That is what BLIP and BLIP-2 were trained with, so it is the default;
    `fix_overflow=True` gives the intended PIL.ImageOps.autocontrast result instead.
    """
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        high, low = int(ch.max()), int(ch.min())
        if high <= low:
            out[..., c] = ch
            continue
        scale = 255 / (high - low)
        offset = -low * scale if fix_overflow else ((-low) % 256) * scale
        table = np.arange(256) * scale + offset
        out[..., c] = table.clip(0, 255).astype(np.uint8)[ch]
    return out


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation as PIL.ImageOps.equalize (the reference's equalize_func).

    The reference counts in float32; integer counts give the same numbers for up to 2**24 pixels,
    far above the crop sizes RandAugment sees.
    """
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[..., c] = ch
            continue
        shifted = np.concatenate([[step // 2], hist[:-1]])
        table = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)
        out[..., c] = table[ch]
    return out


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale every value by `factor` in float32, clip, truncate (the reference's brightness_func)."""
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return table[img]


def _smooth_3x3(img: np.ndarray) -> np.ndarray:
    """cv2.filter2D with the 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13 and OpenCV's default border
    (reflect-101). The window sum S is an integer and S/13 is never within 1/26 of a half, so
    OpenCV's float accumulation and rounding give exactly (S + 6) // 13."""
    padded = np.pad(img.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    total = 4 * padded[1:h + 1, 1:w + 1]  # centre weight 5 = 1 (in the loop) + 4
    for dy in range(3):
        for dx in range(3):
            total = total + padded[dy:dy + h, dx:dx + w]
    return ((total + 6) // 13).astype(np.uint8)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy, `smooth + factor * (img - smooth)` (the reference's sharpness_func).

    As in the reference the one-pixel frame keeps its input values (except at factor 0) and the blend
    is float32 truncated to uint8. For factor > 1 the blend can leave [0, 255], where the reference's
    float->uint8 cast is platform-defined; we clip instead (never reached at BLIP's magnitude 5).
    """
    degenerate = _smooth_3x3(img)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    inner = degenerate[1:-1, 1:-1].astype(np.float32)
    out[1:-1, 1:-1] = inner + np.float32(factor) * (out[1:-1, 1:-1] - inner)
    return out.clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- geometric ops
_AB_BITS = 10  # OpenCV warpAffine: source coordinates in fixed point with 10 fractional bits ...
_INTER_BITS = 5  # ... rounded to 1/32 pixel for the bilinear weights


def warp_affine(img: np.ndarray, matrix, fill=(0, 0, 0)) -> np.ndarray:
    """cv2.warpAffine(img, matrix, (W, H), flags=INTER_LINEAR, borderValue=fill) on uint8 HxWxC.

    `matrix` (2x3) maps source to destination pixel coordinates (pixel centres at integers), as in
    OpenCV. OpenCV inverts it in double, steps through destination pixels in 10-bit fixed point,
    rounds each source position to 1/32 pixel and blends the 2x2 neighbours with integer weights;
    neighbours outside the image take `fill`. We do the same integer arithmetic, so the bytes equal
    OpenCV's (checked against opencv-python-headless 4.5.5.64, LAVIS's pin, and 4.14). A float
    resampler such as PIL's Image.transform(AFFINE, BILINEAR) differs: OpenCV's 1/32-pixel rounding of
    source positions moves values by up to ~2 levels, and PIL replicates edge pixels and fills only
    beyond the edge, where OpenCV blends the last pixel with the fill colour.
    """
    h, w = img.shape[:2]
    m0, m1, m2, m3, m4, m5 = np.asarray(matrix, dtype=np.float64).reshape(6)
    det = m0 * m4 - m1 * m3
    det = 1.0 / det if det != 0 else 0.0
    a11, a12, a21, a22 = m4 * det, m1 * -det, m3 * -det, m0 * det
    b1 = -a11 * m2 - a12 * m5
    b2 = -a21 * m2 - a22 * m5

    scale = 1 << _AB_BITS
    round_delta = scale >> (_INTER_BITS + 1)
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    x_step = np.rint(a11 * xs * scale).astype(np.int32)  # OpenCV's cvRound: half to even, as rint
    y_step = np.rint(a21 * xs * scale).astype(np.int32)
    x_row = np.rint((a12 * ys + b1) * scale).astype(np.int32) + round_delta
    y_row = np.rint((a22 * ys + b2) * scale).astype(np.int32) + round_delta
    sx = (x_row[:, None] + x_step[None, :]) >> (_AB_BITS - _INTER_BITS)  # in 1/32 pixel
    sy = (y_row[:, None] + y_step[None, :]) >> (_AB_BITS - _INTER_BITS)
    tab = 1 << _INTER_BITS
    fx, fy = sx & (tab - 1), sy & (tab - 1)
    sx, sy = sx >> _INTER_BITS, sy >> _INTER_BITS

    # A one-pixel frame of `fill` around the image: any neighbour index outside the image clips onto
    # that frame, which is how OpenCV's constant border treats out-of-range neighbours.
    channels = img.shape[2]
    framed = np.empty((channels, h + 2, w + 2), dtype=np.int32)  # channel planes: long inner loops
    framed[...] = np.asarray(fill, dtype=np.int32)[:channels, None, None]
    framed[:, 1:-1, 1:-1] = np.moveaxis(img, 2, 0)
    framed = framed.reshape(channels, -1)
    x0, x1 = np.clip(sx + 1, 0, w + 1).ravel(), np.clip(sx + 2, 0, w + 1).ravel()
    row0 = np.clip(sy + 1, 0, h + 1).ravel() * (w + 2)
    row1 = np.clip(sy + 2, 0, h + 1).ravel() * (w + 2)
    wx, wy = fx.ravel(), fy.ravel()
    # OpenCV's weights are (tab - f) * f' products times 32 with a 15-bit shift; without the factor 32
    # and a 10-bit shift the result is the same. Written as a + w * (b - a) to save multiplies.
    top = np.take(framed, row0 + x0, axis=1)
    top = (top << _INTER_BITS) + wx * (np.take(framed, row0 + x1, axis=1) - top)
    bottom = np.take(framed, row1 + x0, axis=1)
    bottom = (bottom << _INTER_BITS) + wx * (np.take(framed, row1 + x1, axis=1) - bottom)
    acc = (top << _INTER_BITS) + wy * (bottom - top)
    out = (acc + (1 << (2 * _INTER_BITS - 1))) >> (2 * _INTER_BITS)
    return np.ascontiguousarray(np.moveaxis(out.astype(np.uint8).reshape(channels, h, w), 0, 2))


def shear_x(img: np.ndarray, factor: float, fill=(0, 0, 0)) -> np.ndarray:
    """x' = x + factor * y (the reference builds the matrix in float32)."""
    return warp_affine(img, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(img: np.ndarray, factor: float, fill=(0, 0, 0)) -> np.ndarray:
    """y' = y + factor * x."""
    return warp_affine(img, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(img: np.ndarray, offset: float, fill=(0, 0, 0)) -> np.ndarray:
    """Content moves left by `offset` pixels (the reference's matrix has -offset)."""
    return warp_affine(img, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(img: np.ndarray, offset: float, fill=(0, 0, 0)) -> np.ndarray:
    """Content moves up by `offset` pixels."""
    return warp_affine(img, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def rotation_matrix(center_x: float, center_y: float, degrees: float) -> np.ndarray:
    """cv2.getRotationMatrix2D(center, degrees, 1): counter-clockwise for positive degrees."""
    cx, cy = float(np.float32(center_x)), float(np.float32(center_y))  # OpenCV takes a Point2f
    angle = degrees * (np.pi / 180)
    alpha, beta = np.cos(angle), np.sin(angle)
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy],
                     [-beta, alpha, beta * cx + (1 - alpha) * cy]])


def rotate(img: np.ndarray, degrees: float, fill=(0, 0, 0)) -> np.ndarray:
    """Rotate about (W/2, H/2) by `degrees` (the reference's rotate_func)."""
    h, w = img.shape[:2]
    return warp_affine(img, rotation_matrix(w / 2, h / 2, degrees), fill)


# ----------------------------------------------------------------------------- levels -> arguments
def enhance_factor(level: float) -> float:
    return (level / MAX_LEVEL) * 1.8 + 0.1


def shear_amount(level: float) -> float:
    return (level / MAX_LEVEL) * 0.3


def translate_pixels(level: float) -> float:
    return (level / MAX_LEVEL) * float(TRANSLATE_CONST)


def rotate_degrees(level: float) -> float:
    return (level / MAX_LEVEL) * 30


# op name -> (function, level -> amount, whether a uniform draw *above* 0.5 makes the amount negative;
# the reference tests "< 0.5" for Rotate and "> 0.5" for the others)
_SIGNED_OPS = {
    "ShearX": (shear_x, shear_amount, True),
    "ShearY": (shear_y, shear_amount, True),
    "TranslateX": (translate_x, translate_pixels, True),
    "TranslateY": (translate_y, translate_pixels, True),
    "Rotate": (rotate, rotate_degrees, False),
}


def apply_op(name: str, img: np.ndarray, level: float, rng: np.random.Generator, *,
             fix_autocontrast_overflow: bool = False) -> np.ndarray:
    """One op at `level`. Shear, translate and rotate draw their sign from `rng` here, as the
    reference's level_to_args does (only for ops that are applied), and fill with (128, 128, 128)."""
    if name == "Identity":
        return identity(img)
    if name == "AutoContrast":
        return autocontrast(img, fix_overflow=fix_autocontrast_overflow)
    if name == "Equalize":
        return equalize(img)
    if name == "Brightness":
        return brightness(img, enhance_factor(level))
    if name == "Sharpness":
        return sharpness(img, enhance_factor(level))
    if name in _SIGNED_OPS:
        op, amount_at, negative_above = _SIGNED_OPS[name]
        amount, draw = amount_at(level), rng.random()
        negative = draw > 0.5 if negative_above else draw < 0.5
        return op(img, -amount if negative else amount, FILL)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(BLIP_OPS)}")


@dataclass(frozen=True)
class RandomAugment:
    """The reference `RandomAugment(N, M, isPIL=True, augs=...)`: draw `num_ops` (N) op names
    uniformly with replacement, then apply each with probability 0.5 at level `magnitude` (M).

    Called as `aug(img_uint8_hwc, rng)`; returns uint8 HxWx3 (the input itself if no op ran). A frozen
    dataclass, so it pickles into grain worker processes.
    """

    num_ops: int = 2
    magnitude: float = 5
    ops: tuple[str, ...] = BLIP_OPS
    fix_autocontrast_overflow: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        unknown = [op for op in self.ops if op not in BLIP_OPS]
        if unknown or not self.ops:
            raise ValueError(f"RandomAugment ops must be a non-empty subset of {BLIP_OPS}, got unknown {unknown}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        chosen = rng.integers(len(self.ops), size=self.num_ops)  # np.random.choice(augs, N)
        for index in chosen:
            if rng.random() > 0.5:  # the reference skips when the draw exceeds prob 0.5
                continue
            img = apply_op(self.ops[index], img, self.magnitude, rng,
                           fix_autocontrast_overflow=self.fix_autocontrast_overflow)
        return img
