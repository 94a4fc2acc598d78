"""Reads PyTorch `.pth` state dicts into numpy arrays without importing torch.

PyTorch saves a state dict in one of two layouts:

- the zip layout (torch >= 1.6): `<root>/data.pkl` holds the pickled dict, and
  each tensor storage is a raw little-endian file `<root>/data/<key>`;
- the legacy layout: five pickles and raw records back to back in one file
  (magic number, protocol version, system info, the dict, the list of storage
  keys), then for each key an int64 element count and the raw bytes.

In both, tensors are pickled as calls to `torch._utils._rebuild_tensor_v2`
(storage, offset, size, stride, ...) and storages as persistent ids. The
unpickler below resolves only those few names to numpy stand-ins and refuses
every other global, so a file cannot run code when it is read.
"""

import collections
import pickle
import struct
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class names (legacy typed storages) -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# `torch.<dtype>` objects, pickled by `_rebuild_tensor_v3` and untyped storages.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": "bfloat16",
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
    """Stands in for a `torch.*Storage` class or a `torch.<dtype>` object."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype


class _Storage:
    """A storage whose bytes are read after the pickle names it."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.array = None  # flat numpy array, filled in by the loader

    def set_bytes(self, raw):
        if self.dtype == "bfloat16":
            # numpy has no bfloat16: widen to float32 by shifting the bits up.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            self.array = bits.view(np.float32)
        else:
            self.array = np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<"))
            self.array = self.array.astype(np.dtype(self.dtype), copy=False)

    @property
    def itemsize(self):
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _TensorRef:
    """A strided view of a storage, materialised once all bytes are read."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        self.storage = storage
        self.dtype = dtype  # set when an untyped byte storage must be reinterpreted
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def to_numpy(self):
        flat = self.storage.array
        if flat is None:
            raise ValueError("A tensor refers to a storage whose bytes were never read.")
        if self.dtype is not None and self.dtype != "bfloat16" and flat.dtype != self.dtype:
            flat = flat.view(self.dtype)
        if not self.size:
            return np.array(flat[self.offset])
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size,
            strides=[s * flat.itemsize for s in self.stride])
        return np.array(view)  # copy: the file buffer is read-only and shared


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    return _TensorRef(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict, resolving only tensor and container globals."""

    def __init__(self, file, storage_source):
        super().__init__(file)
        self._storage_source = storage_source

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
                return _rebuild_tensor
            if name == "_rebuild_tensor_v3":
                return _rebuild_tensor_v3
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return _StorageType(name, _STORAGE_DTYPES[name])
            if name == "UntypedStorage":
                return _StorageType(name, np.uint8)
            if name in _TORCH_DTYPES:
                return _StorageType(name, _TORCH_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(name, np.uint8)
        raise pickle.UnpicklingError(
            f"Refusing to load {module}.{name}: only tensors, parameters and "
            "ordered dicts of them can be read from a .pth file here.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"Unsupported persistent id {pid!r}.")
        return self._storage_source(pid[1:])


def _check_state_dict(obj, path):
    """Returns `obj` as an ordered dict of name -> numpy array."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
    out = collections.OrderedDict()
    for key, value in obj.items():
        if isinstance(value, _TensorRef):
            out[key] = value.to_numpy()
    return out


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path} is a zip file without a data.pkl: not a PyTorch save.")
        root = pickles[0][: -len("data.pkl")]
        storages = {}

        def storage_source(args):
            storage_type, key, _location, numel = args[:4]
            if key not in storages:
                storage = _Storage(storage_type.dtype, numel)
                storage.set_bytes(archive.read(f"{root}data/{key}"))
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f, storage_source).load()
    return _check_state_dict(obj, path)


def _load_legacy(path):
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:  # any garbage: say what the file is not
            raise ValueError(f"{path} is neither a zip nor a legacy PyTorch file.") from e
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a zip nor a legacy PyTorch file.")
        protocol = pickle.load(f)
        if protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol}.")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path} was saved on a big-endian machine; not supported.")
        storages = {}

        def storage_source(args):
            storage_type, key, _location, numel, view = args
            if view is not None:
                raise ValueError(f"{path}: storage views are not supported.")
            if key not in storages:
                storages[key] = _Storage(storage_type.dtype, numel)
            return storages[key]

        obj = _RestrictedUnpickler(f, storage_source).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * storage.itemsize)
            if len(raw) != numel * storage.itemsize:
                raise ValueError(f"{path} is truncated (storage {key}).")
            storage.set_bytes(raw)
    return _check_state_dict(obj, path)


def load_torch_state_dict(path):
    """Reads a PyTorch `.pth` state dict as numpy arrays, without torch.

    Args:
      path: a file written by `torch.save(model.state_dict(), path)`, in the zip
        layout or the legacy one. A checkpoint dict with a `"state_dict"` entry
        is unwrapped.

    Returns:
      An `OrderedDict` of parameter name -> numpy array, in file order, with
      PyTorch's layout (convolution kernels `[out, in/groups, kh, kw]`, linear
      weights `[out, in]`). Non-tensor entries are dropped.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not a PyTorch save or does not hold a state dict.
      pickle.UnpicklingError: the pickle names a global other than tensors,
        storages and ordered dicts (nothing else is ever executed).
    """
    path = str(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
