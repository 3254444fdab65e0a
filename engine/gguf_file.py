"""A GGUF file's metadata and tensors, read fast.

The `gguf` package's reader builds a numpy memmap view per field part: for a model with a
49k-token vocabulary (two string arrays of 49k entries) that is about a million views and 4 s
of every start of a worker and of the gateway's tokenizer. This reads the same format (GGUF
v2/v3: header, key/value pairs, tensor infos, aligned data) with `struct` over one `mmap`, and
gives the values `GGUFReader`'s `field.contents()` gives and the tensors' raw data as the same
numpy views (a test compares the two on the default model).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types -> struct format of a scalar (8 STRING, 9 ARRAY handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# ggml tensor types stored as plain numbers (the rest are blocks of bytes).
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (the file lists dimensions fastest first)
    data: np.ndarray        # typed for plain types, else uint8 rows of blocks


class GGUFFile:
    """`fields`: every key's value; `tensors`: in file order. The data stay mapped while the
    object (or a tensor's data) lives."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2, 3)")
        self._off = 24
        # (the header's counts under the names GGUFReader gives them)
        self.fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                       "GGUF.kv_count": n_kv}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ttype, offset = self._unpack("<IQ")
            infos.append((name, tuple(dims), GGMLQuantizationType(ttype), offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        data = np.frombuffer(buf, dtype=np.uint8)
        self.tensors: list[GGUFTensor] = []
        for name, dims, ttype, offset in infos:
            shape = tuple(reversed(dims))
            n = int(np.prod(dims)) if dims else 1
            block, size = GGML_QUANT_SIZES[ttype]
            nbytes = n * size // block
            raw = data[start + offset:start + offset + nbytes]
            if ttype in _PLAIN:
                arr = raw.view(_PLAIN[ttype]).reshape(shape)
            else:
                arr = raw.reshape((*shape[:-1], shape[-1] // block * size))
            self.tensors.append(GGUFTensor(name, ttype, shape, arr))

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._map, self._off)
        self._off += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._off)
        start = self._off + 8
        self._off = start + n
        return self._map[start:start + n].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._string()
        if vtype == 9:
            itype, count = self._unpack("<IQ")
            if itype == 8:
                return [self._string() for _ in range(count)]
            if itype == 9:
                return [self._value(9) for _ in range(count)]
            dt = np.dtype(_NUMPY[itype]).newbyteorder("<")
            arr = np.frombuffer(self._map, dtype=dt, count=count, offset=self._off)
            self._off += count * dt.itemsize
            return arr.tolist()
        (v,) = self._unpack("<" + _SCALARS[vtype])
        return v
