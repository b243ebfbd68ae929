"""Why an image file is unusable, told from its sizes: truncated files and inconsistent headers.

ITK reports a truncated MHA as "No such file or directory", reads a truncated ``.nii.gz`` with missing voxels, and
gives NRRD's own decoder messages. These checks compare the header's promise (dimensions x element size, or the
compressed size) with what the file holds, so that every format says the same thing: "truncated: expected N bytes of
voxel data, found M". Only single-file volumes with attached data are decided; anything else returns None (the
reader's own message stands).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["size_problem"]


#: Bytes per element of the MetaImage element types whose size does not depend on the platform.
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_MET_LOCAL = re.compile(rb"^ElementDataFile\s*=\s*LOCAL[ \t]*\r?\n", re.MULTILINE)


def _truncated(expected: int, found: int, note: str = "") -> str:
    return f"unreadable image (truncated: expected {expected} bytes of voxel data, found {max(found, 0)}{note})"


def _meta_truncation(path: Path) -> str | None:
    """The truncation of an MHA/MHD file holding its voxels (``ElementDataFile = LOCAL``), or None (complete, or
    not decidable from the header: external data file, ASCII data, platform-sized element types)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    match = _MET_LOCAL.search(head)
    if match is None:
        if len(head) < 1 << 16 and b"ElementDataFile" not in head and re.match(rb"\s*(ObjectType|NDims)\s*=", head):
            return "unreadable image (truncated: the MetaImage header ends before its ElementDataFile line)"
        return None
    fields = {}
    for line in head[: match.start()].decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    dims = fields.get("DimSize", "").split()
    if fields.get("NDims", "").isdigit() and len(dims) != int(fields["NDims"]):
        # ITK reports this as a missing ElementType; the size check below would call it a truncation.
        return f"unreadable image (MetaImage header: DimSize has {len(dims)} value(s) but NDims is {fields['NDims']})"
    if fields.get("BinaryData", "True").lower() != "true" or "HeaderSize" in fields:
        return None
    found = path.stat().st_size - match.end()
    if fields.get("CompressedData", "False").lower() == "true":
        if not fields.get("CompressedDataSize", "").isdigit():
            return None
        expected = int(fields["CompressedDataSize"])
        return _truncated(expected, found, ", zlib-compressed") if found < expected else None
    try:
        count = int(np.prod([int(d) for d in fields["DimSize"].split()], dtype=np.int64))
        expected = count * int(fields.get("ElementNumberOfChannels", "1")) * _MET_SIZES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    return _truncated(expected, found) if found < expected else None


def _gunzip_scan(path: Path, keep: int = 0, *, whole: bool = True, offset: int = 0) -> tuple[bytes, int, str | None]:
    """Decompress a gzip file in pieces (all members): ``(first keep bytes, decompressed length, why)``, ``why``
    None for a complete stream, "truncated" when it ends early, else zlib's error. With ``whole=False`` it stops once
    ``keep`` bytes are out (the length is then a lower bound)."""
    head, total = bytearray(), 0
    gz = lambda: zlib.decompressobj(zlib.MAX_WBITS | 16)  # noqa: E731 - gzip wrapper
    inflater = gz()
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(1 << 16)
        try:
            while data:
                out = inflater.decompress(data, 1 << 20)
                total += len(out)
                if len(head) < keep:
                    head += out[: keep - len(head)]
                    if not whole and len(head) >= keep:
                        return bytes(head), total, None
                if inflater.eof:  # end of a member: another one, or trailing bytes (ignored, as gzip tools do)
                    data = inflater.unused_data or fh.read(1 << 16)
                    if not data.startswith(b"\x1f\x8b"):
                        return bytes(head), total, None
                    inflater = gz()
                else:
                    data = inflater.unconsumed_tail or fh.read(1 << 16)
        except zlib.error as exc:
            return bytes(head), total, str(exc)
    return bytes(head), total, None if inflater.eof else "truncated"


def _nifti_sizes(head: bytes) -> tuple[int, int] | None:
    """``(vox_offset, voxel data bytes)`` from the start of a NIfTI-1 or NIfTI-2 file, or None (not NIfTI)."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix, offset = struct.unpack(order + "h", head[72:74])[0], struct.unpack(order + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix, dims = struct.unpack(order + "h", head[14:16])[0], struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or bitpix % 8 or any(d < 1 for d in dims[1 : dims[0] + 1]):
        return None
    return int(offset), int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * (bitpix // 8)


def _nifti_truncation(path: Path) -> str | None:
    """The truncation (or broken gzip stream) of a NIfTI file, or None (complete, or no NIfTI header to go by)."""
    if not str(path).lower().endswith(".gz"):
        with open(path, "rb") as fh:
            sizes = _nifti_sizes(fh.read(540))
        if sizes is None:
            return None
        found = path.stat().st_size - sizes[0]
        return _truncated(sizes[1], found) if found < sizes[1] else None
    sizes = _nifti_sizes(_gunzip_scan(path, 540, whole=False)[0])
    if sizes is None:
        return None
    offset, expected = sizes
    # Fast path: the gzip trailer records the stream's length (mod 2^32); decompress it all only when it disagrees.
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        if int.from_bytes(fh.read(4), "little") == (offset + expected) % (1 << 32):
            return None
    _, length, why = _gunzip_scan(path)
    found = length - offset
    if why is None:
        return None if found >= expected else _truncated(expected, found)
    if why == "truncated":
        if found >= expected:  # the voxels decode, but the stream (and its checksum) is cut off
            return f"unreadable image (truncated: the gzip stream ends early, after all {expected} bytes of voxel data)"
        return _truncated(expected, found)
    return f"unreadable image (gzip stream broken after {length} decompressed bytes: {why})"


_NRRD_SIZES = {1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t", "char"),
               2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                   "unsigned short", "unsigned short int", "uint16", "uint16_t"),
               4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
               8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                   "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                   "double")}
_NRRD_BYTES = {name: size for size, names in _NRRD_SIZES.items() for name in names}


def _nrrd_truncation(path: Path) -> str | None:
    """The truncation of a NRRD file with attached raw or gzip data, or None (complete, detached, other encoding)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = re.search(rb"\r?\n\r?\n", head)
    if not head.startswith(b"NRRD") or end is None:
        return None
    fields = {}
    for line in head[: end.start()].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip()
    if {"data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"} & set(fields):
        return None
    sizes = fields.get("sizes", "").split()
    if fields.get("dimension", "").isdigit() and len(sizes) != int(fields["dimension"]):
        return f"unreadable image (NRRD header: sizes has {len(sizes)} value(s) but dimension is {fields['dimension']})"
    try:
        count = int(np.prod([int(d) for d in sizes], dtype=np.int64))
        expected = count * _NRRD_BYTES[fields["type"].lower()]
    except (KeyError, ValueError):
        return None
    encoding = fields.get("encoding", "raw").lower()
    if encoding == "raw":
        found = path.stat().st_size - end.end()
    elif encoding in ("gzip", "gz"):
        with open(path, "rb") as fh:  # fast path, as for .nii.gz: the gzip trailer records the length (mod 2^32)
            fh.seek(-4, 2)
            if int.from_bytes(fh.read(4), "little") == expected % (1 << 32):
                return None
        _, found, why = _gunzip_scan(path, offset=end.end())
        if why not in (None, "truncated"):
            return f"unreadable image (gzip stream broken after {found} decompressed bytes: {why})"
    else:
        return None
    return _truncated(expected, found) if found < expected else None


def size_problem(path: Path) -> str | None:
    """Why ``path`` (a NIfTI, NRRD or MHA file) is unusable judging by its sizes (truncated, or a MetaImage header
    whose dimensions disagree), or None when it looks complete or cannot be decided from the header."""
    name = str(path).lower()
    try:
        if name.endswith((".mha", ".mhd")):
            return _meta_truncation(path)
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_truncation(path)
        if name.endswith(".nrrd"):
            return _nrrd_truncation(path)
    except OSError:
        return None
    return None
