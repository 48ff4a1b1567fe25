"""Embedders: pHash against imagehash, the +-1 mapping, and the Keras models with weights=None."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from neardup.config import DEFAULTS, model_spec
from neardup.embed.decode import decode_image
from neardup.embed.embedders import (
    PHashEmbedder,
    cosine_to_hamming,
    hamming_to_cosine,
    keras_cache_dir,
    l2_normalize,
)
from neardup.embed.models import make_embedder
from neardup.errors import InputError, WeightsError
from neardup.testing import product_photo


def _phash_input(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return decode_image(buf.getvalue(), 32, mode="L", resample="lanczos").pixels


def _bits(img: Image.Image) -> np.ndarray:
    return PHashEmbedder().bits(_phash_input(img)[None])[0]


def test_phash_equals_imagehash_bit_for_bit() -> None:  # PNG: no JPEG draft decoding involved
    for seed in range(20):
        img = product_photo(seed)
        ours = _bits(img)
        theirs = imagehash.phash(img).hash.flatten()
        assert (ours != theirs).sum() <= 1, seed  # float rounding may flip a bit sitting on the median


def test_pm1_mapping_gives_exactly_one_minus_two_hamming_over_64() -> None:
    emb = PHashEmbedder()
    batch = np.stack([_phash_input(product_photo(s)) for s in range(12)])
    bits, xb = emb.bits(batch), emb.embed(batch)
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, rtol=0, atol=1e-7)
    ham = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.testing.assert_array_equal(xb @ xb.T, hamming_to_cosine(ham).astype(np.float32))
    assert cosine_to_hamming(model_spec("phash").threshold) == pytest.approx(14)


def _variants(img: Image.Image) -> list[Image.Image]:
    # Crops are left out on purpose: pHash is not crop-robust (a 3% crop moves it by up to ~16 bits); the
    # benchmark/notes report its recall on crops instead of pretending here.
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return [img.resize((w // 2, h // 2)), Image.open(io.BytesIO(buf.getvalue())),
            ImageEnhance.Brightness(img).enhance(1.15), ImageEnhance.Brightness(img).enhance(0.85)]


def test_phash_near_copies_within_threshold_and_unrelated_not() -> None:
    emb = PHashEmbedder()
    t = model_spec("phash").threshold
    originals = [product_photo(s) for s in range(10)]
    xo = emb.embed(np.stack([_phash_input(o) for o in originals]))
    for k, img in enumerate(originals):
        xv = emb.embed(np.stack([_phash_input(v) for v in _variants(img)]))
        assert (xv @ xo[k] >= t).all(), k
    off_diag = (xo @ xo.T)[~np.eye(len(xo), dtype=bool)]
    assert (off_diag < t).all()


def test_l2_normalize() -> None:
    x = np.array([[3, 4], [0, 0]], np.float64)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0, 0]])
    assert l2_normalize(x).dtype == np.float32


def test_unknown_model_and_phash_weights_refused() -> None:
    with pytest.raises(InputError, match="unknown model"):
        make_embedder("alexnet", "none")
    with pytest.raises(InputError, match="no weights"):
        make_embedder("phash", "/some/file.h5")


# --------------------------------------------------------------------------- Keras (TensorFlow) models


def _photos(n: int) -> np.ndarray:
    out = []
    for s in range(n):
        buf = io.BytesIO()
        product_photo(s).save(buf, "JPEG", quality=90)
        out.append(decode_image(buf.getvalue(), 224).pixels)
    return np.stack(out)


@pytest.fixture(scope="module")
def resnet():
    return make_embedder("resnet50", "none", runtime="tf")  # the Keras model itself (ONNX: tests/test_onnx.py)


@pytest.mark.slow
def test_resnet50_shape_norm_and_batch_independence(resnet) -> None:
    x = _photos(5)
    whole = resnet.embed(x)
    assert whole.shape == (5, 2048) and whole.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    parts = np.concatenate([resnet.embed(x[:1]), resnet.embed(x[1:3]), resnet.embed(x[3:])])
    np.testing.assert_allclose(parts, whole, atol=2e-5)
    np.testing.assert_array_equal(resnet.embed(x), whole)  # same input, same vectors
    assert resnet.weights_fingerprint == "none" and resnet.dim == 2048


@pytest.mark.slow
def test_resnet50_weights_none_is_identical_across_processes(resnet, tmp_path: Path) -> None:
    # A store built in one process must be queryable from another: the random init is seeded.
    x = _photos(2)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys; from neardup.embed.models import make_embedder; "
            f"x = np.load({str(tmp_path / 'x.npy')!r}); "
            f"np.save({str(tmp_path / 'y.npy')!r}, make_embedder('resnet50', 'none', runtime='tf').embed(x))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), resnet.embed(x), atol=1e-5)


@pytest.mark.slow
def test_weights_file_path_is_loaded_and_fingerprinted(resnet, tmp_path: Path) -> None:
    path = tmp_path / "resnet.weights.h5"
    resnet._model.save_weights(path)
    from_file = make_embedder("resnet50", str(path), runtime="tf")
    assert from_file.weights_fingerprint.startswith("sha256:")
    x = _photos(2)
    np.testing.assert_allclose(from_file.embed(x), resnet.embed(x), atol=1e-5)
    with pytest.raises(WeightsError, match="not found"):
        make_embedder("resnet50", str(tmp_path / "missing.h5"))
    (tmp_path / "junk.weights.h5").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot load weights"):
        make_embedder("resnet50", str(tmp_path / "junk.weights.h5"))


@pytest.mark.slow
def test_offline_imagenet_error_names_cache_path_option_and_phash(monkeypatch, tmp_path: Path) -> None:
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -2] Name or "
                        "service not known")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(WeightsError) as err:
        make_embedder("resnet50", "imagenet")
    msg = str(err.value)
    assert str(keras_cache_dir()) in msg and str(tmp_path / "kh") in msg
    assert "--weights PATH" in msg and "NEARDUP_WEIGHTS" in msg and "--model phash" in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_vgg16_fc1_is_4096_d() -> None:
    vgg = make_embedder("vgg16", "none", runtime="tf")
    y = vgg.embed(_photos(2))
    assert y.shape == (2, 4096) and vgg.dim == 4096
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_keras_precision_is_validated() -> None:
    with pytest.raises(InputError, match="precision"):
        make_embedder("resnet50", "none", precision="fp8")
    assert DEFAULTS.precision == "float32"


def test_phash_of_jpegs_agrees_with_imagehash() -> None:
    # JPEGs decode in draft mode at >= 64 px; the hash must stay the reference pHash, within a bit or two.
    # Measured on these 40 synthetic photos: mean 0.75 bits, max 4 (without the 2x draft rule: mean 2.3, max 6)
    diffs = []
    for seed in range(40):
        buf = io.BytesIO()
        product_photo(seed, (600, 450)).save(buf, "JPEG", quality=90)
        ours = PHashEmbedder().bits(decode_image(buf.getvalue(), 32, mode="L", resample="lanczos").pixels[None])[0]
        diffs.append(int((ours != imagehash.phash(Image.open(io.BytesIO(buf.getvalue()))).hash.flatten()).sum()))
    assert np.mean(diffs) <= 1.0 and max(diffs) <= 4, diffs
