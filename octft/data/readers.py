"""Turn the bytes of one OCT file into a `Volume`: DICOM, NIfTI or NumPy.

The format is chosen by content first, then by name: a DICOM preamble (``DICM`` at byte
128), the NIfTI header magic, the ``.npy`` magic, a zip (``.npz``) or a gzip stream (read,
then sniffed again; ``.nii.gz`` in practice). A file named ``.dcm`` or with no extension
that starts like a DICOM data set without a preamble is read as DICOM too.

Conventions, the same for every format:

* ``array`` is ``(frames, height, width)``: frames are the B-scans. The stored dtype is
  kept (uint8, uint16, float32, ...), in native byte order; nothing is rescaled
  (DICOM Rescale Slope/Intercept are not applied) and MONOCHROME1 is not inverted.
* DICOM colour becomes luminance: YBR_* is first converted to RGB by pydicom, then the
  ITU-R BT.601 weights (0.299 R + 0.587 G + 0.114 B) apply; integer results are rounded
  back to the stored dtype. (A YBR variant pydicom cannot convert keeps its Y channel.)
  A single-frame DICOM gives ``frames == 1``.
* NIfTI: nibabel's data is indexed ``(i, j, k)`` = (columns, rows, B-scans) in
  AI-READI-like OCT files, so the array is ``data.transpose(2, 1, 0)``, i.e.
  ``array[k, j, i] == data[i, j, k]``, and ``spacing`` is the zooms reversed, converted
  to mm. A 2-D image gives ``frames == 1``; trailing singleton axes past the third
  (a 4-D file holding one volume) are dropped; any other 4-D file is an error. Header
  scaling (``scl_slope``) is applied when set, which makes the array float.
* NumPy: a 3-D array is taken as it is, a 2-D one gets a frame axis. An ``.npz`` must
  hold one array, or one named ``volume`` or ``array``.

``meta`` always has ``format``, ``participant_id``, ``device``, ``laterality``,
``region``, ``spacing`` (mm per (frame, row, column); an unknown entry is None, and the
whole is None when nothing is known) and ``source``; DICOM adds ``transfer_syntax`` (the
UID), ``photometric_interpretation`` and ``modality``.

Every failure is an `OctReadError` naming the file and the reason; no other exception
type leaves `read_volume`. A volume larger than `MAX_DECLARED_BYTES` is refused from its
header, before anything is inflated or allocated (see there for why that bound).
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import zlib
from pathlib import Path, PurePath
from typing import Any

import nibabel
import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from octft.io import file_kind
from octft.data.ids import canonical_participant_id
from octft.data.layout import LATERALITIES
from octft.data.volume import OctReadError, Volume

_NOT_RECOGNISED = "not DICOM, NIfTI or NumPy"
_DICOM_SUFFIXES = {"", ".dcm", ".dicom"}
_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_PIXEL_DATA_TAG_LITTLE, _PIXEL_DATA_TAG_BIG = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# ITU-R BT.601 luma weights for R, G, B.
_BT601 = np.array([0.299, 0.587, 0.114])
_NIFTI_UNITS_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}
# Inside a gzip stream, the inner format is recognised from this much decompressed data; its header then
# bounds the rest, so a stream that inflates past what its content declares (a gzip bomb) stops there.
_GZIP_SNIFF_BYTES = 1 << 20
# Deflated Explicit VR Little Endian: the data set after the file meta is one deflate stream (a bomb's carrier).
_DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"
_FILE_META_SCAN = 4096
# The most a volume may hold: a header declaring more is refused before anything is allocated or inflated, so a
# small file declaring gigabytes (a gzip or zip bomb, a forged DICOM or NIfTI header) never reaches memory.
# Why this figure and not one derived from the clip size (data.preprocess frames x height x width): the clip is
# made by picking B-scans and resizing them, so its size says nothing about the source's; a 4 x 32 x 32 smoke clip
# is rightly made from a 128 x 1024 x 512 Cirrus cube. What bounds the pipeline is the sources it must read: the
# densest cube OCT scanners write is 256 B-scans of 1024 x 1024 (Triton 3D wide: 256 x 992 x 512; an AI-READI
# volume is at most ~130 MB), 1 GiB as 32-bit values. Decoding holds about three copies of it (inflated bytes,
# array, contiguous copy), so reading one volume needs at most ~3 GiB.
MAX_DECLARED_BYTES = 1 << 30
# A file may carry this much beside its pixels (DICOM metadata, private tags, NIfTI extensions).
_MAX_OTHER_BYTES = 64 << 20


def read_volume(source: str | Path | bytes, *, name: str | None = None) -> Volume:
    """Read one OCT volume from a path or from bytes.

    `name` is what errors (and ``meta["source"]``) call the file; give it when passing
    bytes so that a failure names the object, and so that the extension can help.

    >>> volume = read_volume("1001_oct_l.dcm")                      # doctest: +SKIP
    >>> volume.array.shape, volume.meta["laterality"]               # doctest: +SKIP
    ((97, 496, 512), 'L')
    >>> read_volume(blob, name="b2://bucket/1001_oct_l.dcm")        # doctest: +SKIP
    """
    label = name or ("<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source))
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(Path(source), label)
        return _read_bytes(data, label, name_for_format=label)
    except MemoryError:
        # Every header is bounded by MAX_DECLARED_BYTES; this is a machine with less memory than that takes.
        raise OctReadError(label, "not enough memory to decode it (the machine ran out of memory)") from None


def describe_volume(volume: Volume) -> dict[str, Any]:
    """Shape, dtype, value range and meta of a volume, JSON serialisable.

    Statistics skip NaN and infinities; they are None when no finite value exists.

    >>> import json
    >>> json.dumps(describe_volume(read_volume("1001_oct_l.dcm")))  # doctest: +SKIP
    """
    array = volume.array
    values = array if array.dtype.kind in "ui" else array[np.isfinite(array)]
    if values.size:
        low, high = values.min().item(), values.max().item()
        mean = float(values.mean(dtype=np.float64))
    else:
        low = high = mean = None
    return {
        "shape": [int(size) for size in array.shape],
        "dtype": str(array.dtype),
        "min": low,
        "max": high,
        "mean": mean,
        "meta": _json_safe(volume.meta),
    }


# --- choosing the format ---------------------------------------------------------------


def _read_file(path: Path, label: str) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise OctReadError(label, "file not found") from None
    except OSError as exc:
        raise OctReadError(label, f"cannot open: {exc.strerror or exc}") from None
    except (TypeError, ValueError) as exc:  # e.g. a NUL byte in the path
        raise OctReadError(label, f"cannot open: {_one_line(exc)}") from None
    # Checked on the opened file, not the name: nothing can be swapped in between.
    file_stat = os.fstat(descriptor)
    mode = file_stat.st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        if stat.S_ISDIR(mode):
            raise OctReadError(label, "is a directory, not a file")
        raise OctReadError(label, f"is {file_kind(mode)}, not a regular file: copy the volume into a file first")
    if file_stat.st_size > MAX_DECLARED_BYTES + _MAX_OTHER_BYTES:
        os.close(descriptor)
        raise OctReadError(label, f"the file holds {file_stat.st_size} bytes, more than any OCT volume "
                                  f"({MAX_DECLARED_BYTES} bytes of pixels at most)")
    with os.fdopen(descriptor, "rb") as file:
        try:
            return file.read()
        except OSError as exc:
            raise OctReadError(label, f"cannot read: {exc.strerror or exc}") from None


def _read_bytes(data: bytes, label: str, *, name_for_format: str, inside_gzip: bool = False) -> Volume:
    fmt = _sniff_format(data, label, name_for_format)
    if fmt == "gzip":
        if inside_gzip:
            raise OctReadError(label, f"{_NOT_RECOGNISED}: gzip inside gzip")
        # Sniff the inner bytes by the name without `.gz`, so `x.dcm.gz` still hints DICOM.
        inner_name = re.sub(r"\.gz$", "", name_for_format, flags=re.IGNORECASE)
        inner = _gunzip_bounded(data, label, inner_name)
        return _read_bytes(inner, label, name_for_format=inner_name, inside_gzip=True)

    reader = _READERS[fmt]
    try:
        array, meta = reader(data, label)
        array = _as_native(array)
    except OctReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom, nibabel, numpy, warnings-as-errors: one error type
        raise OctReadError(label, f"cannot read as {fmt}: {type(exc).__name__}: {_one_line(exc)}") from exc
    _check_array(array, label)
    base = {
        "format": fmt,
        "participant_id": None,
        "device": None,
        "laterality": None,
        "region": None,
        "spacing": None,
        "source": label,
    }
    return Volume(array=array, meta={**base, **meta})


def _sniff_format(data: bytes, label: str, name: str) -> str:
    """'dicom' | 'nifti' | 'npy' | 'npz' | 'gzip', or an OctReadError saying why none."""
    if not data:
        raise OctReadError(label, "empty file (0 bytes)")
    if data[:2] == _GZIP_MAGIC:
        return "gzip"
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:6] == _NPY_MAGIC:
        return "npy"
    if data[:4] == _ZIP_MAGIC:
        return "npz"
    if _nifti_version(data) is not None:
        return "nifti"

    suffix = _suffix(name)
    if suffix in _DICOM_SUFFIXES and _looks_like_dicom_without_preamble(data):
        return "dicom"
    expected = {".nii": "NIfTI", ".gz": "gzip", ".npy": "NumPy .npy", ".npz": "NumPy .npz"}.get(suffix)
    if suffix in (".dcm", ".dicom"):
        expected = "DICOM"
    if suffix == ".hdr" or data[344:348] == b"ni1\0":
        raise OctReadError(
            label, "NIfTI header/image pair (.hdr/.img) is not supported: convert to a single .nii"
        )
    hint = f" (named {suffix} but the content does not start like {expected})" if expected else ""
    raise OctReadError(label, f"{_NOT_RECOGNISED}{hint}")


def _suffix(name: str) -> str:
    suffix = PurePath(name).suffix.lower()
    # DICOM files are often named by their UID ("1.2.840.113619.2.55"): a numeric suffix
    # is part of the name, not an extension.
    return "" if suffix[1:].isdigit() else suffix


def _looks_like_dicom_without_preamble(data: bytes) -> bool:
    """A data set written without preamble starts with a group 0002 or 0008 element."""
    if len(data) < 8:
        return False
    group_little, group_big = int.from_bytes(data[:2], "little"), int.from_bytes(data[:2], "big")
    if group_little not in (0x0002, 0x0008) and group_big != 0x0008:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    length = int.from_bytes(data[4:8], "little" if group_little in (0x0002, 0x0008) else "big")
    return length <= len(data) - 8  # implicit VR: the first value must fit in the file


def _gunzip_bounded(data: bytes, label: str, inner_name: str) -> bytes:
    """The one gzip member in `data`, inflated no further than its content's header says it holds."""
    inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer around the deflate stream
    try:
        head = inflater.decompress(data, _GZIP_SNIFF_BYTES)
        if not inflater.eof and not inflater.unconsumed_tail:
            raise OctReadError(label, "corrupt gzip: the stream ends early (truncated file?)")
        limit = _declared_size(head, label, inner_name, complete=inflater.eof)
        pieces, total = [head], len(head)
        while not inflater.eof and inflater.unconsumed_tail:
            piece = inflater.decompress(inflater.unconsumed_tail, min(limit - total + 1, 1 << 24))
            total += len(piece)
            if total > limit:
                raise OctReadError(
                    label, f"gzip stream inflates past the {limit} bytes its content declares (a gzip bomb?)"
                )
            pieces.append(piece)
    except zlib.error as exc:
        raise OctReadError(label, f"corrupt gzip: {_one_line(exc)}") from None
    if not inflater.eof:
        raise OctReadError(label, "corrupt gzip: the stream ends early (truncated file?)")
    if inflater.unused_data.strip(b"\0"):
        raise OctReadError(label, "gzip holds more than one member: decompress it and read the file")
    return b"".join(pieces)


def _declared_size(head: bytes, label: str, name: str, *, complete: bool) -> int:
    """How many bytes the file starting with `head` says it holds; an OctReadError when it says nothing."""
    if complete:  # inflated whole within the sniffing window: nothing left to bound
        return len(head)
    fmt = _sniff_format(head, label, name)
    try:
        if fmt == "npy":
            header = io.BytesIO(head)
            version = np.lib.format.read_magic(header)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(header)
            declared = header.tell() + math.prod(shape) * dtype.itemsize
        elif fmt == "nifti":
            image_type = nibabel.Nifti1Image if _nifti_version(head) == 1 else nibabel.Nifti2Image
            header = image_type.header_class.from_fileobj(io.BytesIO(head))
            shape, dtype = header.get_data_shape(), header.get_data_dtype()
            declared = int(header.get_data_offset()) + math.prod(shape) * dtype.itemsize
        elif fmt == "dicom":
            declared = _dicom_declared_size(head, label)
        else:  # gzip in gzip, or a zip: refused when read; bound them by the window
            declared = len(head)
    except OctReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy and nibabel raise several types on a broken header
        raise OctReadError(label, f"cannot read the {fmt} header inside gzip: {_one_line(exc)}") from None
    if fmt != "dicom":  # a DICOM's pixels are checked on their own: its declared size allows for metadata
        _check_declared(declared, label)
    return max(declared, len(head))


def _check_declared(declared: int, label: str) -> None:
    if declared > MAX_DECLARED_BYTES:
        raise OctReadError(label, f"its header declares {declared} bytes of pixels, more than any OCT volume holds "
                                  f"({MAX_DECLARED_BYTES} at most): refused before reading them")


def _dicom_declared_size(head: bytes, label: str) -> int:
    position = min((p for p in (head.find(_PIXEL_DATA_TAG_LITTLE), head.find(_PIXEL_DATA_TAG_BIG)) if p >= 0),
                   default=-1)
    if position < 0:
        raise OctReadError(label, f"DICOM inside gzip has no Pixel Data within its first {len(head)} bytes")
    try:
        dataset = pydicom.dcmread(io.BytesIO(head[:position]), force=True)
        values = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("NumberOfFrames") or 1)
                  * int(dataset.get("SamplesPerPixel") or 1))
        bits = int(dataset.get("BitsAllocated") or 64)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken header
        raise OctReadError(label, f"DICOM inside gzip: unreadable header ({_one_line(exc)})") from None
    _check_declared(math.ceil(values * bits / 8), label)
    # Compressed pixel data is smaller than native; allow for fragment items and trailing elements.
    return position + math.ceil(values * bits / 8) * 11 // 10 + (1 << 20)


# --- DICOM -----------------------------------------------------------------------------


def _read_dicom(data: bytes, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    if _DEFLATED_SYNTAX in data[:_FILE_META_SCAN]:
        _check_deflated_size(data, label)
    dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        # pydicom drops a Pixel Data element that the file ends inside (with a warning only).
        if _PIXEL_DATA_TAG_LITTLE in data or _PIXEL_DATA_TAG_BIG in data:
            raise OctReadError(label, "truncated: the file ends inside its Pixel Data element")
        raise OctReadError(label, "no Pixel Data element: the DICOM holds no image")
    syntax = _transfer_syntax(dataset)
    if not syntax.is_transfer_syntax:
        raise OctReadError(
            label, f"cannot decode transfer syntax {syntax}: not a transfer syntax pydicom knows"
        )
    syntax_text = f"{syntax.name} ({syntax})"

    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frames = int(dataset.get("NumberOfFrames") or 1)
    samples = int(dataset.get("SamplesPerPixel") or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if samples not in (1, 3):
        raise OctReadError(
            label, f"SamplesPerPixel {samples} is not supported: expected 1 (grey) or 3 (colour)"
        )
    if photometric == "PALETTE COLOR":
        raise OctReadError(label, "PALETTE COLOR images are not supported: convert to MONOCHROME2 or RGB")
    # Before decoding: a compressed frame declaring gigapixels would otherwise be allocated by the decoder.
    _check_declared(rows * columns * frames * samples * max(int(dataset.get("BitsAllocated") or 8), 8) // 8, label)
    if not syntax.is_compressed:
        _check_native_length(dataset, rows, columns, frames, samples, photometric, label)

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise OctReadError(
            label, f"cannot decode transfer syntax {syntax_text}: pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise OctReadError(label, f"cannot decode transfer syntax {syntax_text}: install {needs}")
    try:
        array, decoded = decoder.as_array(dataset, as_rgb=True)
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        raise OctReadError(
            label, f"cannot decode pixel data ({syntax_text}; truncated or corrupt?): {_one_line(exc)}"
        ) from exc

    if samples == 3:
        array = _luminance(array, str(decoded.get("photometric_interpretation", "RGB")))
    if array.size != frames * rows * columns:
        raise OctReadError(
            label,
            f"decoded {array.size} values, expected {frames} frames x {rows} x {columns}: corrupt header?",
        )
    meta = _dicom_meta(dataset)
    meta.update(transfer_syntax=str(syntax), photometric_interpretation=photometric or None)
    return array.reshape(frames, rows, columns), meta


def _check_deflated_size(data: bytes, label: str) -> None:
    """A Deflated Explicit VR data set must not inflate past what its own header declares.

    pydicom inflates the whole data set at once; counted here first, in chunks that are dropped, so a small file
    inflating to gigabytes is refused instead of filling memory.
    """
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        raise OctReadError(label, "deflated DICOM without a standard file meta header: not supported")
    start = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000) File Meta Information Group Length
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as the standard stores the data set
    try:
        head = inflater.decompress(data[start:], _GZIP_SNIFF_BYTES)
        if inflater.eof or not inflater.unconsumed_tail:
            return  # inflated whole within the window, or truncated: pydicom reports that
        limit, total = _dicom_declared_size(head, label), len(head)
        while not inflater.eof and inflater.unconsumed_tail:
            total += len(inflater.decompress(inflater.unconsumed_tail, min(limit - total + 1, 1 << 24)))
            if total > limit:
                raise OctReadError(
                    label, f"deflated data set inflates past the {limit} bytes its header declares (a zip bomb?)"
                )
    except zlib.error as exc:
        raise OctReadError(label, f"corrupt deflated data set: {_one_line(exc)}") from None


def _transfer_syntax(dataset: Any) -> Any:
    file_meta = getattr(dataset, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return UID(str(syntax))
    # No file meta (a bare data set): the encoding pydicom found while reading tells it.
    implicit, little = dataset.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_native_length(dataset, rows, columns, frames, samples, photometric, label) -> None:
    keyword = next(keyword for keyword in _PIXEL_KEYWORDS if keyword in dataset)
    bits = int(
        dataset.get("BitsAllocated") or {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword, 8)
    )
    values = rows * columns * frames * samples
    expected = math.ceil(values / 8) if bits == 1 else values * bits // 8
    if photometric == "YBR_FULL_422":  # two chroma samples shared by each pixel pair
        expected = expected * 2 // 3
    held = len(dataset[keyword].value or b"")
    if held < expected:
        raise OctReadError(label, f"truncated: pixel data holds {held} of {expected} bytes")


def _luminance(array: np.ndarray, photometric: str) -> np.ndarray:
    if photometric.upper().startswith("YBR"):
        # pydicom left it as YCbCr (no RGB conversion exists for it): Y is the luminance.
        return array[..., 0]
    luma = array.astype(np.float64) @ _BT601
    if array.dtype.kind in "ui":
        info = np.iinfo(array.dtype)
        return np.clip(np.rint(luma), info.min, info.max).astype(array.dtype)
    return luma.astype(array.dtype)


def _dicom_meta(dataset: Any) -> dict[str, Any]:
    groups = [
        _first_item(dataset, "SharedFunctionalGroupsSequence"),
        _first_item(dataset, "PerFrameFunctionalGroupsSequence"),
    ]
    groups = [group for group in groups if group is not None]
    anatomy = [_first_item(group, "FrameAnatomySequence") for group in groups]
    anatomy = [item for item in anatomy if item is not None]
    measures = [dataset] + [
        item for group in groups if (item := _first_item(group, "PixelMeasuresSequence")) is not None
    ]

    device = " ".join(
        _text(dataset.get(key)) or "" for key in ("Manufacturer", "ManufacturerModelName")
    ).strip()

    laterality = None
    for holder, key in [(dataset, "ImageLaterality"), (dataset, "Laterality")] + [
        (item, "FrameLaterality") for item in anatomy
    ]:
        value = (_text(holder.get(key)) or "").upper()
        if value in LATERALITIES:
            laterality = value
            break

    region = None
    for holder in [dataset] + anatomy:
        code = _first_item(holder, "AnatomicRegionSequence")
        if code is not None and (region := _text(code.get("CodeMeaning"))):
            break

    return {
        "participant_id": canonical_participant_id(_text(dataset.get("PatientID"))),
        "device": device or None,
        "laterality": laterality,
        "region": region,
        "spacing": _dicom_spacing(measures),
        "modality": _text(dataset.get("Modality")),
    }


def _dicom_spacing(holders: list[Any]) -> tuple[float | None, float | None, float | None] | None:
    row = column = frame = None
    for holder in holders:
        pixel_spacing = holder.get("PixelSpacing")
        if row is None and pixel_spacing is not None and len(pixel_spacing) == 2:
            row, column = float(pixel_spacing[0]), float(pixel_spacing[1])
        for key in ("SpacingBetweenSlices", "SliceThickness"):  # distance between B-scans wins over thickness
            value = holder.get(key)
            if frame is None and value not in (None, ""):
                frame = float(value)
    spacing = (frame, row, column)
    return None if spacing == (None, None, None) else spacing


def _first_item(holder: Any, keyword: str) -> Any:
    sequence = holder.get(keyword)
    return sequence[0] if sequence else None


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


# --- NIfTI -----------------------------------------------------------------------------


def _nifti_version(data: bytes) -> int | None:
    for byteorder in ("little", "big"):
        header_size = int.from_bytes(data[:4], byteorder)
        if header_size == 348 and data[344:348] == b"n+1\0":
            return 1
        if header_size == 540 and data[4:8] == b"n+2\0":
            return 2
    return None


def _read_nifti(data: bytes, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    image_type = nibabel.Nifti1Image if _nifti_version(data) == 1 else nibabel.Nifti2Image
    # The header alone first: the image loader reads the data at once and would fail vaguely.
    header = image_type.header_class.from_fileobj(io.BytesIO(data))
    shape = tuple(int(size) for size in header.get_data_shape())
    offset = int(header.get_data_offset())
    expected = math.prod(shape) * header.get_data_dtype().itemsize
    _check_declared(expected, label)
    held = max(len(data) - offset, 0)
    if held < expected:
        raise OctReadError(label, f"truncated: image data holds {held} of {expected} bytes")

    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        if len(shape) == 4:
            raise OctReadError(
                label, f"4-D NIfTI holds {shape[3]} volumes, shape {shape}: expected one volume"
            )
        raise OctReadError(label, f"wrong dimensionality: NIfTI shape {shape}, expected 2-D or 3-D")
    data_ijk = np.asanyarray(image_type.from_bytes(data).dataobj).reshape(shape)
    if data_ijk.ndim == 2:
        data_ijk = data_ijk[:, :, np.newaxis]
    array = np.ascontiguousarray(data_ijk.transpose(2, 1, 0))

    space_unit = header.get_xyzt_units()[0]
    to_mm = _NIFTI_UNITS_TO_MM.get(space_unit, 1.0)
    # A zoom of 0 means the header does not say.
    zooms = [float(zoom) * to_mm or None for zoom in header.get_zooms()[: len(shape)]] + [None]
    spacing = (zooms[2], zooms[1], zooms[0])
    spacing = None if spacing == (None, None, None) else spacing
    return array, {"spacing": spacing}


# --- NumPy -----------------------------------------------------------------------------


def _read_npy(data: bytes, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    return _as_frames(np.load(io.BytesIO(data), allow_pickle=False), label), {}


def _read_npz(data: bytes, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        keys = list(archive.files)
        if len(keys) == 1:
            key = keys[0]
        else:
            key = next((key for key in ("volume", "array") if key in keys), None)
        if key is None:
            raise OctReadError(
                label, f".npz holds arrays {keys}: expected one array, or one named 'volume' or 'array'"
            )
        # The zip directory's size bounds what the member inflates to (zipfile reads no further): a zip bomb
        # is refused here, before it is inflated.
        member = key if key in archive.zip.namelist() else f"{key}.npy"  # as numpy names its members
        _check_declared(archive.zip.getinfo(member).file_size, label)
        return _as_frames(archive[key], label), {}


def _as_frames(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise OctReadError(
            label,
            f"wrong dimensionality: shape {array.shape}, expected (frames, height, width) or (height, width)",
        )
    return array


# --- shared ----------------------------------------------------------------------------

_READERS = {"dicom": _read_dicom, "nifti": _read_nifti, "npy": _read_npy, "npz": _read_npz}


def _as_native(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:  # decoders may hand out views of the file's bytes
        array = array.copy()
    return array


def _check_array(array: np.ndarray, label: str) -> None:
    if array.dtype.kind not in "uif":
        raise OctReadError(label, f"not an image: dtype {array.dtype} is not numeric")
    if array.ndim != 3:
        raise OctReadError(
            label, f"wrong dimensionality: shape {array.shape}, expected (frames, height, width)"
        )
    if array.size == 0:
        raise OctReadError(label, f"empty image: shape {array.shape}")
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            # Training would turn these into NaN losses; refused here, where the file is named.
            raise OctReadError(label, f"{bad} of {array.size} pixel values are NaN or infinite")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    # Exact base types: pydicom's DSfloat or IS subclass them and carry their own repr.
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    return None if value is None else str(value)
