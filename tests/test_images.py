"""ImageProcessor / load_image vs transformers' BlipImageProcessor (PIL backend)."""

import json

import numpy as np
import pytest
from PIL import Image

from blip_jax.images import ImageProcessor, load_image

transformers = pytest.importorskip("transformers")
# Without torchvision, transformers.BlipImageProcessor *is* this class (see test_hf_backend_resolution).
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

TOL = 1e-5
SIZES = [{"height": 32, "width": 48}, None]  # None: BLIP default 384x384


def _rgb(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8) if c else rng.integers(0, 256, (h, w), dtype=np.uint8)


def _pil_images(rng):
    p_trans = Image.fromarray(_rgb(rng, 30, 30)).convert("P")
    p_trans.info["transparency"] = 5  # palette transparency -> composited onto white
    return {
        "RGB": Image.fromarray(_rgb(rng, 37, 53)),
        "L": Image.fromarray(_rgb(rng, 50, 20, 0)),
        "RGBA": Image.fromarray(_rgb(rng, 31, 64, 4)),
        "LA": Image.fromarray(_rgb(rng, 20, 20)).convert("LA"),
        "P": Image.fromarray(_rgb(rng, 40, 40)).convert("P"),
        "P+transparency": p_trans,
        "CMYK": Image.fromarray(_rgb(rng, 33, 21)).convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 300, (25, 30), dtype=np.uint16)),
        "large": Image.fromarray(_rgb(rng, 400, 500)),
        "1x1": Image.fromarray(_rgb(rng, 1, 1)),
    }


def _hf(size, images):
    hf = BlipImageProcessorPil(**({"size": size} if size else {}))
    return hf(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _ours(size):
    return ImageProcessor(**({"size": size} if size else {}))


def test_hf_backend_resolution():
    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision installed: BlipImageProcessor uses the torchvision backend")
    assert transformers.BlipImageProcessor().__class__ is BlipImageProcessorPil
    assert BlipImageProcessorPil.resample == Image.Resampling.BICUBIC == ImageProcessor().resample


@pytest.mark.parametrize("size", SIZES)
def test_pil_modes_match_hf(size):
    rng = np.random.default_rng(0)
    ours = _ours(size)
    for mode, im in _pil_images(rng).items():
        out = ours(im)
        h, w = (size or {"height": 384, "width": 384}).values()
        assert out.shape == (1, h, w, 3) and out.dtype == np.float32, mode
        assert np.abs(out - _hf(size, im)).max() <= TOL, mode


@pytest.mark.parametrize("size", SIZES)
def test_numpy_and_batches_match_hf(size):
    rng = np.random.default_rng(1)
    ours = _ours(size)
    arrays = [_rgb(rng, 20, 30), _rgb(rng, 45, 17, 4), _rgb(rng, 8, 9)]
    for a in arrays:  # uint8 HxWx3 and HxWx4 (alpha composited onto white)
        assert np.abs(ours(a) - _hf(size, a)).max() <= TOL
    pil = list(_pil_images(rng).values())[:4]
    batch = arrays + pil  # mixed list
    assert np.abs(ours(batch) - _hf(size, batch)).max() <= TOL
    # grayscale HxW (transformers rejects a bare 2-D array; we treat it like PIL mode "L")
    g = _rgb(rng, 20, 30, 0)
    assert np.abs(ours(g) - _hf(size, Image.fromarray(g))).max() <= TOL
    # uint8 [B, H, W, 3] batch
    b = rng.integers(0, 256, (2, 11, 13, 3), dtype=np.uint8)
    assert np.abs(ours(b) - _hf(size, list(b))).max() <= TOL


def test_file_paths_match_hf(tmp_path):
    rng = np.random.default_rng(2)
    files = {
        "rgb.png": Image.fromarray(_rgb(rng, 40, 60)),
        "rgba.png": Image.fromarray(_rgb(rng, 30, 20, 4)),  # path loading drops alpha (transformers' load_image)
        "gray.jpg": Image.fromarray(_rgb(rng, 50, 30, 0)),
        "rgb.jpg": Image.fromarray(_rgb(rng, 64, 64)),
        "i16.png": Image.fromarray(rng.integers(0, 400, (20, 24), dtype=np.uint16)),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    # EXIF orientation 6 (rotate 90): applied when loading from a path
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(rng, 20, 50)).save(tmp_path / "exif.jpg", exif=exif)
    assert load_image(tmp_path / "exif.jpg").shape == (50, 20, 3)
    ours = _ours({"height": 32, "width": 48})
    paths = [tmp_path / n for n in [*files, "exif.jpg"]]
    for p in paths:
        assert np.abs(ours(p) - _hf({"height": 32, "width": 48}, str(p))).max() <= TOL, p.name
        assert np.abs(ours(str(p)) - ours(p)).max() == 0
    assert np.abs(ours(paths) - _hf({"height": 32, "width": 48}, [str(p) for p in paths])).max() <= TOL


def test_load_image_errors(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        load_image(bad)
    good = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(trunc)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ImageProcessor()([str(tmp_path / "missing.png")])
    with pytest.raises(TypeError):
        load_image(3.5)
    with pytest.raises(ValueError, match="channels-first"):
        load_image(np.zeros((3, 20, 30), np.uint8))


def test_preprocessed_passthrough_and_nchw_error():
    ip = ImageProcessor(size={"height": 32, "width": 48})
    x = np.random.default_rng(3).standard_normal((2, 32, 48, 3))
    out = ip(x)
    assert out.dtype == np.float32 and out.shape == (2, 32, 48, 3)
    np.testing.assert_array_equal(out, x.astype(np.float32))
    assert ip(x[0]).shape == (1, 32, 48, 3)
    assert ip(list(x)).shape == (2, 32, 48, 3)
    with pytest.raises(ValueError, match="NHWC"):
        ip(x.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="NHWC"):
        ip(x[0].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="spatial size"):
        ip(np.zeros((1, 16, 16, 3), np.float32))


def test_config_roundtrip(tmp_path):
    # HF-written config -> ours
    hf = BlipImageProcessorPil(size={"height": 40, "width": 24}, image_mean=[0.5, 0.5, 0.5], image_std=0.25,
                               resample=Image.Resampling.BILINEAR)
    hf.save_pretrained(tmp_path / "hf")
    ours = ImageProcessor.from_dir(tmp_path / "hf")
    assert ours.size == {"height": 40, "width": 24} and ours.resample == 2
    img = Image.fromarray(_rgb(np.random.default_rng(4), 33, 57))
    ref = hf(img, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.abs(ours(img) - ref).max() <= TOL
    # ours -> HF
    ours.save(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "BlipImageProcessor" and cfg["size"] == {"height": 40, "width": 24}
    hf2 = BlipImageProcessorPil.from_pretrained(tmp_path / "ours")
    assert np.abs(hf2(img, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1) - ref).max() <= TOL
    # defaults when the directory has no preprocessor_config.json; missing directory is an error
    assert ImageProcessor.from_dir(tmp_path) == ImageProcessor()
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_dir(tmp_path / "nope")
    d = ImageProcessor().to_dict()
    assert d["size"] == {"height": 384, "width": 384} and d["resample"] == 3
    assert d["rescale_factor"] == pytest.approx(1 / 255)
