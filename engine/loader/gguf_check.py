"""Is a GGUF file whole? Its header says where every tensor's data lies; a file shorter
than that was cut off (an interrupted download or copy).

Read before the GGUF reader, which fails on a truncated file in ways that look like an
unsupported architecture or quantization ("cannot reshape array ..."), so the user is
told to download the file again instead of looking for another model (issue 12).
Only the header is read (a few hundred KiB, however large the file).
"""

from __future__ import annotations

import struct
from pathlib import Path

# GGUF metadata value types -> their size in bytes (strings and arrays are read apart).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _Truncated(Exception):
    """The file ended inside its header."""


class _Unreadable(Exception):
    """The header is not one this check understands: leave the verdict to the reader."""


def truncation_problem(path: Path) -> str | None:
    """Why ``path`` (a file starting with the GGUF magic) is truncated, or ``None`` when it
    holds all the tensor data its header describes (or the header can't be judged here).
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            expected = _expected_size(_Reader(fh, size))
    except _Truncated:
        return (f"the file is truncated: it ends inside its header, after {size} bytes. Download it "
                "again (an interrupted download or copy leaves a file like this).")
    except (_Unreadable, OSError):
        return None
    if expected is not None and size < expected:
        return (f"the file is truncated ({size} of {expected} bytes): download it again (an interrupted "
                "download or copy leaves a file like this).")
    return None


class _Reader:
    def __init__(self, fh, size: int) -> None:
        self.fh, self.size, self.order = fh, size, "<"

    def read(self, n: int) -> bytes:
        if n < 0 or self.fh.tell() + n > self.size:
            raise _Truncated()
        return self.fh.read(n)

    def unpack(self, fmt: str):
        fmt = self.order + fmt
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def skip(self, n: int) -> None:
        if n < 0 or self.fh.tell() + n > self.size:
            raise _Truncated()
        self.fh.seek(n, 1)

    def string(self) -> bytes:
        return self.read(self.unpack("Q"))


def _expected_size(r: _Reader) -> int | None:
    """Bytes the file must hold: the end of its last tensor's data."""
    if r.read(4) != b"GGUF":
        raise _Unreadable()
    version = r.unpack("I")
    if version & 0xFFFF == 0:  # written big-endian
        r.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version < 2:
        raise _Unreadable()  # GGUF v1 used 32-bit counts; none is in use any more
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("I")
        if key == b"general.alignment" and vtype == 4:
            alignment = r.unpack("I") or _DEFAULT_ALIGNMENT
        else:
            _skip_value(r, vtype)
    end = 0
    for _ in range(n_tensors):
        r.string()
        dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
        ggml_type, offset = r.unpack("I"), r.unpack("Q")
        nbytes = _tensor_bytes(dims, ggml_type)
        if nbytes is None:
            return None  # a type this gguf package doesn't know: no verdict
        end = max(end, offset + nbytes)
    data_start = -(-r.fh.tell() // alignment) * alignment
    return data_start + end


def _skip_value(r: _Reader, vtype: int) -> None:
    if vtype in _SCALAR_BYTES:
        r.skip(_SCALAR_BYTES[vtype])
    elif vtype == _STRING:
        r.skip(r.unpack("Q"))
    elif vtype == _ARRAY:
        item, count = r.unpack("I"), r.unpack("Q")
        if item in _SCALAR_BYTES:
            r.skip(_SCALAR_BYTES[item] * count)
        else:
            for _ in range(count):
                _skip_value(r, item)
    else:
        raise _Unreadable()


def _tensor_bytes(dims: list[int], ggml_type: int) -> int | None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    count = 1
    for d in dims:
        count *= d
    return count // block * type_bytes
