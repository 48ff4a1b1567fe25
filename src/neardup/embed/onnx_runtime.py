"""Embed, onnx_runtime: embed with any ONNX image model on ONNX Runtime, preprocessing given explicitly.

One class runs both the built-in CNNs (exported from Keras by `onnx_export`, taking uint8 pixels) and a user's
own model (`--model onnx:PATH`: a copy-detection model, DINOv2, CLIP's image tower...). What a model needs
before its first layer is an `OnnxPreprocess`, written in the store as one canonical line, so a query embeds
exactly as the index did. onnxruntime is imported when a model is loaded (far sooner ready than TensorFlow).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..config import ENV_ORT_DEVICE
from ..errors import InputError, WeightsError
from ..fileio import file_sha256
from ..threads import cores
from .embedders import l2_normalize

log = logging.getLogger(__name__)

_CHOICES = {"layout": ("nhwc", "nchw"), "order": ("rgb", "bgr"), "fit": ("stretch", "crop"),
            "dtype": ("float32", "uint8"), "pool": ("none", "nchw", "nhwc", "tokens", "first")}


@dataclass(frozen=True)
class OnnxPreprocess:
    """How decoded RGB pixels become a model's input, and which output is the embedding.

    x = ((pixels in `order`) * scale - mean) / std, laid out as `layout`, as `dtype` (uint8: the raw pixels,
    for models that preprocess inside their graph). `fit`: stretch to size x size (as Keras' load_img), or
    resize the shorter side and crop the centre. `input`/`output`: tensor names ("" = the only one).
    `pool`: how an output of more than two axes becomes one vector, said explicitly because its layout cannot
    be guessed: nchw / nhwc (average a feature map over its spatial axes), tokens (average [n, t, c] over t),
    first ([n, t, c]: the first token, e.g. a ViT's CLS); "none" takes [n, d] as it is.
    """

    size: int = 224
    layout: str = "nhwc"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    order: str = "rgb"
    fit: str = "stretch"
    dtype: str = "float32"
    input: str = ""
    output: str = ""
    pool: str = "none"

    def spec(self) -> str:
        """The canonical one-line form, recorded in the store and accepted by `parse`."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            text = ":".join(repr(float(x)) for x in v) if isinstance(v, tuple) else (
                repr(float(v)) if isinstance(v, float) else str(v))
            parts.append(f"{f.name}={text}")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str | None) -> OnnxPreprocess:
        """Read `key=value,...` (keys as the fields; mean/std as a:b:c; scale may be a fraction such as 1/255);
        missing keys keep their defaults. InputError names a bad key or value."""
        values: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for item in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in known:
                raise InputError(f"bad preprocessing item {item!r}; keys are {', '.join(sorted(known))}")
            if key in values:
                raise InputError(f"preprocessing key {key!r} is given twice")
            try:
                if key == "size":
                    values[key] = int(raw)
                elif key == "scale":
                    num, _, den = raw.partition("/")  # 1/255, 0.5/255 or 0.0039
                    values[key] = float(num) / float(den) if den else float(num)
                elif key in ("mean", "std"):
                    triple = tuple(float(x) for x in raw.split(":"))
                    values[key] = triple * 3 if len(triple) == 1 else triple
                else:
                    values[key] = raw.lower() if key in _CHOICES else raw
            except (ValueError, ZeroDivisionError):
                raise InputError(f"bad value in preprocessing item {item!r}") from None
        if values.get("dtype") == "uint8":
            values.setdefault("scale", 1.0)  # raw pixels: the float default 1/255 does not apply
        pre = cls(**values)
        pre.check()
        return pre

    def check(self) -> None:
        """InputError for values no model can take."""
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise InputError(f"preprocessing {key}={getattr(self, key)} is not one of {', '.join(allowed)}")
        if not 8 <= self.size <= 4096:
            raise InputError(f"preprocessing size={self.size} is out of range (8..4096)")
        if len(self.mean) != 3 or len(self.std) != 3 or 0.0 in self.std:
            raise InputError("preprocessing mean and std need three values (std non-zero), e.g. mean=0.485:0.456:0.406")
        if not (np.isfinite(self.scale) and self.scale > 0 and np.isfinite(self.mean).all()
                and np.isfinite(self.std).all()):
            raise InputError("preprocessing scale must be positive, and scale, mean and std finite numbers")
        if self.dtype == "uint8" and (self.scale != 1.0 or self.mean != (0.0,) * 3 or self.std != (1.0,) * 3
                                      or self.order != "rgb"):
            raise InputError("dtype=uint8 passes the raw RGB pixels: leave scale=1, mean, std and order unset")

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] RGB -> the model's input array."""
        if self.dtype == "uint8":
            x = np.ascontiguousarray(pixels, dtype=np.uint8)
        else:
            x = pixels.astype(np.float32)
            if self.order == "bgr":
                x = x[..., ::-1]
            x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "nchw" else x)


def _ort() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise WeightsError("onnxruntime is not installed: pip install onnxruntime") from None
    return onnxruntime


def providers() -> list[str]:
    """ONNX Runtime's execution providers for a session: CUDA first where ENV_ORT_DEVICE asks for it (a Ray
    actor given a GPU sets it) and this onnxruntime has it (the onnxruntime-gpu package), else the CPU."""
    if os.environ.get(ENV_ORT_DEVICE) == "cuda":
        if "CUDAExecutionProvider" in _ort().get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("a GPU was given but this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); "
                    "running on the CPU")
    return ["CPUExecutionProvider"]


def _one_line(exc: Exception) -> str:
    """An onnxruntime error as one line (its useful part, e.g. "Got: 32 Expected: 1", is often not the first)."""
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def _shape(arg: Any) -> list:  # an onnxruntime NodeArg
    return [d if isinstance(d, int) else None for d in (arg.shape or [])]


class OnnxEmbedder:
    """An ONNX image model as an `Embedder`: uint8 RGB batches in, L2-normalized float32 rows out."""

    input_mode = "RGB"
    resample = "bilinear"

    def __init__(self, path: str | os.PathLike[str], pre: OnnxPreprocess | None = None, *, name: str = "onnx",
                 weights_fingerprint: str | None = None, preprocessing: str | None = None,
                 precision: str = "float32", threads: int = 0, optimized: Path | None = None) -> None:
        pre = pre or OnnxPreprocess()
        pre.check()
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise WeightsError(f"ONNX model not found: {self.path} (if it moved: `neardup update DIR --model "
                               f"onnx:NEWPATH` records its new place; `--weights NEWPATH` uses it once)")
        self._session = self._open(threads, optimized)
        self._input = self._pick_input(pre)
        pre = replace(pre, input=self._input.name)
        self._output = self._pick_output(pre)
        self.pre = replace(pre, output=self._output)
        self.name = name
        self.weights = str(self.path)
        #: the model's own metadata (an exported built-in CNN records its weights fingerprint there)
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        # a neardup export names the Keras weights it came from; any other model is fingerprinted by its bytes
        self.weights_fingerprint = (weights_fingerprint or self.metadata.get("neardup_weights_fingerprint")
                                    or "sha256:" + file_sha256(self.path)[:16])
        self.preprocessing = preprocessing or self.pre.spec()
        self.input_size = self.pre.size
        self.fit = self.pre.fit
        self.runtime = "onnx"
        self.precision = precision
        #: a model exported with a fixed batch size (torch.onnx.export's default is 1) is run in chunks of it
        self.fixed_batch = _shape(self._input)[0]
        shape = _shape(next(o for o in self._session.get_outputs() if o.name == self._output))
        want = {"none": 2, "nchw": 4, "nhwc": 4, "tokens": 3, "first": 3}[self.pre.pool]
        if len(shape) != want:
            hint = ("pool=nchw or pool=nhwc (a feature map)" if len(shape) == 4 else "pool=tokens or pool=first "
                    "(token embeddings)" if len(shape) == 3 else "pool=none" if len(shape) == 2 else "another output")
            raise InputError(f"output {self._output} of {self.path.name} has shape {shape} ({len(shape)} axes) but "
                             f"pool={self.pre.pool} expects {want}; use {hint}")
        if len(shape) == 2 and shape[1]:
            self.dim = int(shape[1])
        else:  # a symbolic or pooled output: one tiny run tells its size
            n = self.fixed_batch or 1
            self.dim = int(self._run(np.zeros((n, self.pre.size, self.pre.size, 3), np.uint8)).shape[1])

    def _open(self, threads: int, optimized: Path | None) -> Any:  # an onnxruntime InferenceSession
        """A CPU session. With `optimized` (a file for this machine and onnxruntime version), the graph ONNX
        Runtime optimised once is loaded as it is: a session then starts without optimising the graph again."""
        ort = _ort()
        run_on = providers()
        if run_on[0] != "CPUExecutionProvider":
            optimized = None  # the optimised copy is made for this machine's CPU

        def session(path: Path, optimize: bool = True, save_as: Path | None = None) -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or cores()  # the thread owner's count unless told
            opts.log_severity_level = 3
            # No spinning: ORT's idle threads would busy-wait for the next run, taking the cores that decoding,
            # local features and verification need (measured, MobileNetV2, 2 cores: a verified query 37 ms
            # instead of 53; indexing 600 photos 8.5 s either way; the model alone at batch 32 5 % slower).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if not optimize:
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if save_as is not None:
                opts.optimized_model_filepath = str(save_as)
            return ort.InferenceSession(str(path), opts, providers=run_on)

        if optimized is not None and optimized.is_file():
            try:
                return session(optimized, optimize=False)
            except Exception:  # a damaged copy: drop it, use the model itself
                optimized.unlink(missing_ok=True)
        tmp = optimized.with_name(f".{optimized.name}.{os.getpid()}.tmp") if optimized is not None else None
        try:
            try:
                sess = session(self.path, save_as=tmp)
            except Exception:  # saving the optimised copy is best effort (a full or read-only cache)
                if tmp is None:
                    raise
                tmp.unlink(missing_ok=True)
                tmp = None
                sess = session(self.path)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"cannot load ONNX model {self.path}: {_one_line(exc)}") from None
        if tmp is not None and optimized is not None and tmp.is_file():
            try:
                os.replace(tmp, optimized)  # complete: a concurrent run sees the old name or this file
            except OSError:
                tmp.unlink(missing_ok=True)
        return sess

    def _pick_input(self, pre: OnnxPreprocess) -> Any:  # an onnxruntime NodeArg
        inputs = self._session.get_inputs()
        names = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        if pre.input:
            match = [i for i in inputs if i.name == pre.input]
            if not match:
                raise InputError(f"{self.path.name} has no input {pre.input!r}; its inputs: {names}")
            arg = match[0]
        elif len(inputs) == 1:
            arg = inputs[0]
        else:
            raise InputError(f"{self.path.name} has several inputs ({names}); choose one with input=NAME")
        shape = _shape(arg)
        want_type = "tensor(uint8)" if pre.dtype == "uint8" else "tensor(float)"
        if arg.type != want_type:
            raise InputError(f"input {arg.name} of {self.path.name} takes {arg.type}, not {want_type}; "
                             f"set dtype={'uint8' if arg.type == 'tensor(uint8)' else 'float32'}")
        if len(shape) != 4:
            raise InputError(f"input {arg.name} of {self.path.name} has shape {arg.shape}; an image model takes "
                             f"a 4-D batch")
        channels, spatial = (shape[3], shape[1:3]) if pre.layout == "nhwc" else (shape[1], shape[2:4])
        if channels not in (None, 3):
            other = "nchw" if pre.layout == "nhwc" else "nhwc"
            raise InputError(f"input {arg.name} of {self.path.name} has shape {arg.shape}: not 3 channels in "
                             f"layout={pre.layout}; try layout={other}")
        if any(s not in (None, pre.size) for s in spatial):
            raise InputError(f"input {arg.name} of {self.path.name} has shape {arg.shape}; set size= to its "
                             f"spatial size (size={pre.size} given)")
        return arg

    def _pick_output(self, pre: OnnxPreprocess) -> str:
        outputs = self._session.get_outputs()
        names = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        if pre.output:
            if pre.output not in [o.name for o in outputs]:
                raise InputError(f"{self.path.name} has no output {pre.output!r}; its outputs: {names}")
            return pre.output
        if len(outputs) == 1:
            return outputs[0].name
        raise InputError(f"{self.path.name} has several outputs ({names}); choose the embedding with output=NAME")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or len(batch)
        parts = []
        for i in range(0, len(batch), step):
            chunk = batch[i:i + step]
            pad = step - len(chunk)  # a fixed-batch model's last chunk is padded, its extra rows dropped
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            try:
                (y,) = self._session.run([self._output], {self._input.name: self.pre.apply(chunk)})
            except Exception as exc:  # onnxruntime raises its own exception types
                raise InputError(f"{self.path.name} failed on a batch of {len(chunk)} {chunk.shape[1]}x"
                                 f"{chunk.shape[2]} images: {_one_line(exc)}") from None
            parts.append(np.asarray(y, dtype=np.float32)[:step - pad])
        y = np.concatenate(parts)
        pool = self.pre.pool
        if pool in ("nchw", "nhwc"):
            y = y.mean(axis=(2, 3) if pool == "nchw" else (1, 2))
        elif pool == "tokens":
            y = y.mean(axis=1)
        elif pool == "first":
            y = y[:, 0]
        if not np.isfinite(y).all():  # never stored: a NaN row would match nothing, silently
            raise InputError(f"{self.path.name} produced non-finite values (NaN or inf); check the model file and "
                             f"the preprocessing")
        return y.reshape(len(batch), -1)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [n, s, s, 3] -> float32 [n, d], rows of unit L2 norm."""
        batch = np.asarray(batch, dtype=np.uint8)
        s = self.pre.size
        if batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 [n, {s}, {s}, 3], got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._run(batch))
