"""read_volume and describe_volume on real files written here: DICOM by pydicom, NIfTI by
nibabel, NumPy by numpy, JPEG frames by Pillow."""

from __future__ import annotations

import gzip
import io
import json
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from octft.data.readers import describe_volume, read_volume
from octft.data.volume import OctReadError, Volume

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
# 32 x 40 frames: OpenJPEG's default of 6 resolution levels needs both sides >= 32.
FRAMES, ROWS, COLUMNS = 3, 32, 40


# --- test data -------------------------------------------------------------------------


def oct_pixels(dtype=np.uint8, high: int = 255, seed: int = 0) -> np.ndarray:
    """A smooth, non-symmetric volume with a little texture, so that lossy codecs stay close."""
    frame, row, column = np.meshgrid(np.arange(FRAMES), np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    smooth = 20 + 4 * row + 2 * column + 15 * frame
    texture = np.random.default_rng(seed).integers(0, 4, smooth.shape)
    return ((smooth + texture) * (high / 255)).clip(0, high).astype(dtype)


def oct_dataset(pixels: np.ndarray, *, photometric: str | None = None, multi_frame: bool = True) -> Dataset:
    """An Ophthalmic Tomography-like data set: Modality OPT, shared functional groups."""
    samples = 3 if pixels.ndim == (4 if multi_frame else 3) else 1
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = OPHTHALMIC_TOMOGRAPHY
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = OPHTHALMIC_TOMOGRAPHY
    dataset.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OPT"
    dataset.PatientID = "AIREADI-01001"
    dataset.Manufacturer = "Heidelberg Engineering"
    dataset.ManufacturerModelName = "Spectralis"
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = photometric or ("RGB" if samples == 3 else "MONOCHROME2")
    if samples == 3:
        dataset.PlanarConfiguration = 0
    if multi_frame:
        dataset.NumberOfFrames = pixels.shape[0]
        measures = Dataset()
        measures.PixelSpacing = [0.0039, 0.0057]
        measures.SliceThickness = 0.12
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "5665001", "SCT", "Retina"
        anatomy = Dataset()
        anatomy.FrameLaterality = "L"
        anatomy.AnatomicRegionSequence = Sequence([region])
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.FrameAnatomySequence = Sequence([anatomy])
        dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    dataset.Rows, dataset.Columns = pixels.shape[-3:-1] if samples == 3 else pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    return dataset


def write(dataset: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    """Save with `syntax` (uncompressed or deflated) as a DICOM file with preamble."""
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.save_as(path, enforce_file_format=True)
    return path


def encapsulate_jpeg_frames(dataset: Dataset, frames: np.ndarray, mode: str) -> None:
    """JPEG baseline frames encoded by Pillow, placed in the data set as pydicom would."""
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame, mode).save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    dataset.PixelData = encapsulate(encoded)
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if mode == "RGB":
        # Pillow stores colour JPEG as YCbCr with subsampled chroma.
        dataset.PhotometricInterpretation = "YBR_FULL_422"


def luminance(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def assert_names(error: pytest.ExceptionInfo, label: str, *reason_parts: str) -> None:
    assert error.value.source == label
    assert label in str(error.value)
    for part in reason_parts:
        assert part in error.value.reason, error.value.reason


# --- DICOM transfer syntaxes ----------------------------------------------------------

UNCOMPRESSED = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
LOSSLESS_COMPRESSED = [RLELossless, JPEG2000Lossless, JPEGLSLossless]


@pytest.mark.parametrize("syntax", UNCOMPRESSED + LOSSLESS_COMPRESSED, ids=lambda uid: UID(uid).keyword)
def test_lossless_transfer_syntaxes_round_trip_exactly(tmp_path, syntax):
    pixels = oct_pixels()
    dataset = oct_dataset(pixels)
    if UID(syntax).is_compressed:
        if not get_encoder(syntax).is_available:
            pytest.skip(f"no encoder for {UID(syntax).name} here: {get_encoder(syntax).missing_dependencies}")
        dataset.compress(syntax)
        path = tmp_path / "oct.dcm"
        dataset.save_as(path, enforce_file_format=True)
    else:
        path = write(dataset, tmp_path / "oct.dcm", syntax)

    volume = read_volume(path)

    assert volume.array.shape == (FRAMES, ROWS, COLUMNS)
    assert volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, pixels)
    assert volume.meta["transfer_syntax"] == syntax
    assert volume.meta["format"] == "dicom"
    assert volume.meta["participant_id"] == "1001"
    assert volume.meta["device"] == "Heidelberg Engineering Spectralis"
    assert volume.meta["laterality"] == "L"
    assert volume.meta["region"] == "Retina"
    assert volume.meta["spacing"] == pytest.approx((0.12, 0.0039, 0.0057))
    assert volume.meta["modality"] == "OPT"
    assert volume.meta["source"] == str(path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["little", "big"])
def test_sixteen_bit_dicom_keeps_uint16_values_in_either_byte_order(tmp_path, syntax):
    pixels = oct_pixels(np.uint16, high=4095)
    dataset = oct_dataset(pixels)
    dataset.BitsStored, dataset.HighBit = 12, 11
    if syntax == ExplicitVRBigEndian:
        dataset.PixelData = pixels.astype(">u2").tobytes()

    volume = read_volume(write(dataset, tmp_path / "oct16.dcm", syntax))

    assert volume.array.dtype == np.uint16 and volume.array.dtype.isnative
    np.testing.assert_array_equal(volume.array, pixels)
    assert volume.array.flags.writeable


@pytest.mark.parametrize(
    ("syntax", "options", "max_error", "mean_error"),
    [(JPEG2000, {"j2k_cr": [5]}, 12, 2.0), (JPEGLSNearLossless, {"jls_error": 2}, 2, 2.0)],
    ids=["jpeg2000", "jpegls_near_lossless"],
)
def test_lossy_transfer_syntaxes_stay_close(tmp_path, syntax, options, max_error, mean_error):
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no encoder for {UID(syntax).name} here: {get_encoder(syntax).missing_dependencies}")
    pixels = oct_pixels()
    dataset = oct_dataset(pixels)
    dataset.compress(syntax, **options)
    dataset.save_as(tmp_path / "lossy.dcm", enforce_file_format=True)

    volume = read_volume(tmp_path / "lossy.dcm")

    assert volume.array.shape == (FRAMES, ROWS, COLUMNS) and volume.array.dtype == np.uint8
    difference = np.abs(volume.array.astype(int) - pixels)
    assert difference.max() <= max_error
    assert difference.mean() <= mean_error
    assert volume.meta["transfer_syntax"] == syntax


def test_jpeg_baseline_grey_frames_from_pillow(tmp_path):
    pixels = oct_pixels()
    dataset = oct_dataset(pixels)
    encapsulate_jpeg_frames(dataset, pixels, "L")
    dataset.save_as(tmp_path / "baseline.dcm", enforce_file_format=True)

    volume = read_volume(tmp_path / "baseline.dcm")

    assert volume.array.shape == (FRAMES, ROWS, COLUMNS) and volume.array.dtype == np.uint8
    assert np.abs(volume.array.astype(int) - pixels).mean() < 3
    assert volume.meta["transfer_syntax"] == JPEGBaseline8Bit


# --- colour --------------------------------------------------------------------------


def colour_pixels() -> np.ndarray:
    frame, row, column = np.meshgrid(np.arange(2), np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    return np.stack([200 - 3 * row, 5 * column + 20 * frame, 30 + 2 * row + column], axis=-1).astype(np.uint8)


def test_multi_frame_rgb_becomes_bt601_luminance(tmp_path):
    rgb = colour_pixels()
    volume = read_volume(write(oct_dataset(rgb), tmp_path / "rgb.dcm"))

    assert volume.array.shape == (2, ROWS, COLUMNS) and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, np.rint(luminance(rgb)).astype(np.uint8))
    assert volume.meta["photometric_interpretation"] == "RGB"


def test_single_frame_rgb_gives_one_frame(tmp_path):
    rgb = colour_pixels()[1]
    volume = read_volume(write(oct_dataset(rgb, multi_frame=False), tmp_path / "rgb1.dcm"))

    assert volume.array.shape == (1, ROWS, COLUMNS)
    np.testing.assert_array_equal(volume.array[0], np.rint(luminance(rgb)).astype(np.uint8))


def test_ybr_full_is_converted_to_rgb_then_luminance(tmp_path):
    rgb = colour_pixels()
    ybr = convert_color_space(rgb.copy(), "RGB", "YBR_FULL", per_frame=True)
    volume = read_volume(write(oct_dataset(ybr, photometric="YBR_FULL"), tmp_path / "ybr.dcm"))

    assert volume.array.shape == (2, ROWS, COLUMNS)
    # YBR -> RGB -> Y rounds twice: within 2 grey levels of the true luminance.
    assert np.abs(volume.array.astype(float) - luminance(rgb)).max() <= 2


def test_jpeg_baseline_colour_from_pillow_gives_luminance(tmp_path):
    rgb = colour_pixels()
    dataset = oct_dataset(rgb)
    encapsulate_jpeg_frames(dataset, rgb, "RGB")
    dataset.save_as(tmp_path / "colour_jpeg.dcm", enforce_file_format=True)

    volume = read_volume(tmp_path / "colour_jpeg.dcm")

    assert volume.array.shape == (2, ROWS, COLUMNS) and volume.array.dtype == np.uint8
    assert np.abs(volume.array.astype(float) - luminance(rgb)).mean() < 3
    assert volume.meta["photometric_interpretation"] == "YBR_FULL_422"


# --- single frame, top-level attributes, no preamble ----------------------------------


def single_frame_dataset() -> tuple[Dataset, np.ndarray]:
    pixels = oct_pixels()[1]
    dataset = oct_dataset(pixels, multi_frame=False)
    dataset.PatientID = "7042"
    dataset.ImageLaterality = "R"
    dataset.PixelSpacing = [0.0035, 0.011]
    dataset.SliceThickness = 0.3
    dataset.SpacingBetweenSlices = 0.25
    return dataset, pixels


def test_single_frame_dicom_reads_top_level_attributes(tmp_path):
    dataset, pixels = single_frame_dataset()
    volume = read_volume(write(dataset, tmp_path / "one.dcm"))

    assert volume.array.shape == (1, ROWS, COLUMNS)
    np.testing.assert_array_equal(volume.array[0], pixels)
    assert volume.meta["participant_id"] == "7042"
    assert volume.meta["laterality"] == "R"
    assert volume.meta["region"] is None
    # The distance between B-scans is preferred over their thickness.
    assert volume.meta["spacing"] == pytest.approx((0.25, 0.0035, 0.011))


def test_dicom_without_preamble_named_by_uid(tmp_path):
    dataset, pixels = single_frame_dataset()
    del dataset.file_meta
    path = tmp_path / "1.2.826.0.1.3680043.8.498"
    dataset.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"

    volume = read_volume(path)

    np.testing.assert_array_equal(volume.array[0], pixels)
    assert volume.meta["transfer_syntax"] == ImplicitVRLittleEndian


# --- NIfTI ---------------------------------------------------------------------------


def nifti_bytes(data: np.ndarray, zooms: tuple[float, ...], unit: str = "mm") -> bytes:
    image = nibabel.Nifti1Image(data, affine=np.eye(4))
    image.header.set_zooms(zooms)
    image.header.set_xyzt_units(xyz=unit)
    return image.to_bytes()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_axes_are_reversed_to_frames_rows_columns(tmp_path, suffix):
    # (i, j, k) = (columns, rows, B-scans), all sizes different so a wrong transpose shows.
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    payload = nifti_bytes(data, (0.01, 0.002, 0.12))
    path = tmp_path / f"oct{suffix}"
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)

    volume = read_volume(path)

    assert volume.array.shape == (3, 4, 5)
    assert volume.array.dtype == np.int16
    for i, j, k in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        assert volume.array[k, j, i] == data[i, j, k]
    assert volume.array.flags.c_contiguous
    assert volume.meta["format"] == "nifti"
    assert volume.meta["spacing"] == pytest.approx((0.12, 0.002, 0.01))


def test_nifti_in_microns_gives_spacing_in_mm(tmp_path):
    path = tmp_path / "um.nii"
    path.write_bytes(nifti_bytes(np.zeros((5, 4, 3), np.float32), (10.0, 2.0, 120.0), unit="micron"))

    assert read_volume(path).meta["spacing"] == pytest.approx((0.12, 0.002, 0.01))


def test_two_d_nifti_gives_one_frame(tmp_path):
    data = np.arange(20, dtype=np.float32).reshape(5, 4)
    path = tmp_path / "slice.nii"
    path.write_bytes(nifti_bytes(data, (0.01, 0.002)))

    volume = read_volume(path)

    assert volume.array.shape == (1, 4, 5) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], data.T)
    assert volume.meta["spacing"] == pytest.approx((None, 0.002, 0.01))


def test_four_d_nifti_singleton_is_squeezed_and_series_refused(tmp_path):
    data = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3, 1)
    single = tmp_path / "single.nii"
    single.write_bytes(nifti_bytes(data, (1, 1, 1, 1)))
    assert read_volume(single).array.shape == (3, 4, 5)

    series = tmp_path / "series.nii"
    series.write_bytes(nifti_bytes(np.zeros((5, 4, 3, 2), np.uint8), (1, 1, 1, 1)))
    with pytest.raises(OctReadError) as error:
        read_volume(series)
    assert_names(error, str(series), "4-D", "2 volumes")


def test_truncated_nifti(tmp_path):
    payload = nifti_bytes(np.ones((5, 4, 3), np.float32), (1, 1, 1))
    path = tmp_path / "cut.nii"
    path.write_bytes(payload[:-100])
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(
        error, str(path), f"truncated: image data holds {5 * 4 * 3 * 4 - 100} of {5 * 4 * 3 * 4} bytes"
    )


# --- NumPy ---------------------------------------------------------------------------


def test_npy_three_d_and_two_d(tmp_path):
    volume_data = oct_pixels(np.uint16, high=1000)
    np.save(tmp_path / "v.npy", volume_data)
    np.save(tmp_path / "s.npy", volume_data[0].astype(">f4"))

    volume = read_volume(tmp_path / "v.npy")
    np.testing.assert_array_equal(volume.array, volume_data)
    assert volume.array.dtype == np.uint16
    assert volume.meta == {
        "format": "npy",
        "participant_id": None,
        "device": None,
        "laterality": None,
        "region": None,
        "spacing": None,
        "source": str(tmp_path / "v.npy"),
    }
    single = read_volume(tmp_path / "s.npy")
    assert single.array.shape == (1, ROWS, COLUMNS)
    assert single.array.dtype == np.float32 and single.array.dtype.isnative


def test_npz_single_array_or_named_volume(tmp_path):
    pixels = oct_pixels()
    np.savez(tmp_path / "one.npz", anything=pixels)
    np.savez_compressed(tmp_path / "named.npz", volume=pixels, mask=pixels > 100)

    np.testing.assert_array_equal(read_volume(tmp_path / "one.npz").array, pixels)
    named = read_volume(tmp_path / "named.npz")
    np.testing.assert_array_equal(named.array, pixels)
    assert named.meta["format"] == "npz"


def test_npz_with_several_unnamed_arrays_names_its_keys(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, first=np.zeros((2, 3, 4)), second=np.ones((2, 3, 4)))
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "['first', 'second']", "'volume' or 'array'")


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((2, 3, 4, 5), np.uint8), "wrong dimensionality"),
        (np.zeros(7, np.uint8), "wrong dimensionality"),
        (np.zeros((3, 4), bool), "not numeric"),
        (np.zeros((0, 4, 5), np.uint8), "empty image"),
    ],
    ids=["4d", "1d", "bool", "empty"],
)
def test_npy_that_is_not_an_image(tmp_path, array, reason):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), reason)


# --- bad input -----------------------------------------------------------------------


def test_dicom_cut_in_the_middle_of_pixel_data(tmp_path):
    pixels = oct_pixels()
    data = write(oct_dataset(pixels), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 1000])

    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), f"truncated: pixel data holds {pixels.size - 1000} of {pixels.size} bytes")


@pytest.mark.parametrize("warning_action", ["ignore", "error"])
def test_compressed_dicom_cut_short_fails_to_decode(tmp_path, warning_action):
    dataset = oct_dataset(oct_pixels())
    dataset.compress(RLELossless)
    data = io.BytesIO()
    dataset.save_as(data, enforce_file_format=True)
    path = tmp_path / "cut_rle.dcm"
    path.write_bytes(data.getvalue()[:-300])

    # pydicom warns about the missing sequence delimiter; as an error, that warning must
    # still leave as an OctReadError.
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action)
        with pytest.raises(OctReadError) as error:
            read_volume(path)
    assert error.value.source == str(path)
    if warning_action == "ignore":
        assert "truncated: the file ends inside its Pixel Data element" in error.value.reason


def test_dicom_without_pixel_data(tmp_path):
    dataset = oct_dataset(oct_pixels())
    del dataset.PixelData
    path = write(dataset, tmp_path / "report.dcm")
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "no Pixel Data element")


def test_transfer_syntax_without_decoder(tmp_path):
    dataset = oct_dataset(oct_pixels())
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    dataset["PixelData"].VR = "OB"
    dataset.NumberOfFrames = 1
    path = write(dataset, tmp_path / "video.dcm", MPEG2MPML)
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "cannot decode transfer syntax", MPEG2MPML)


def test_corrupt_jpeg2000_codestream(tmp_path):
    dataset = oct_dataset(oct_pixels())
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(200))] * FRAMES)
    dataset["PixelData"].VR = "OB"
    path = write(dataset, tmp_path / "bad_j2k.dcm", JPEG2000Lossless)
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "cannot decode pixel data", "JPEG 2000")


@pytest.mark.parametrize("name", ["notes.txt", "notes.dcm", "notes", "notes.nii"])
def test_text_file_is_not_a_volume(tmp_path, name):
    path = tmp_path / name
    path.write_text("participant 1001 was scanned twice; see the site log.\n" * 20)
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "not DICOM, NIfTI or NumPy")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "empty file")


def test_png_is_not_a_volume(tmp_path):
    path = tmp_path / "fundus.png"
    Image.fromarray(oct_pixels()[0]).save(path)
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "not DICOM, NIfTI or NumPy")


def test_corrupt_gzip_nifti(tmp_path):
    packed = gzip.compress(nifti_bytes(np.ones((5, 4, 3), np.float32), (1, 1, 1)))
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(packed[:-40])
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "corrupt gzip")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.dcm"
    with pytest.raises(OctReadError) as error:
        read_volume(path)
    assert_names(error, str(path), "file not found")


# --- bytes ---------------------------------------------------------------------------


def test_bytes_with_a_name(tmp_path):
    pixels = oct_pixels()
    data = write(oct_dataset(pixels), tmp_path / "oct.dcm").read_bytes()
    label = "b2://octft-data/retinal_oct/structural_oct/1001_l.dcm"

    volume = read_volume(data, name=label)
    np.testing.assert_array_equal(volume.array, pixels)
    assert volume.meta["source"] == label

    with pytest.raises(OctReadError) as error:
        read_volume(data[:-500], name=label)
    assert_names(error, label, "truncated")
    with pytest.raises(OctReadError) as error:
        read_volume(b"plain text")
    assert error.value.source == "<bytes>"


def test_gzipped_npy_bytes_are_sniffed_inside():
    pixels = oct_pixels()
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    volume = read_volume(gzip.compress(buffer.getvalue()), name="cache/1001.npy.gz")
    np.testing.assert_array_equal(volume.array, pixels)
    assert volume.meta["format"] == "npy"


# --- describe_volume ----------------------------------------------------------------


def test_describe_volume_is_json_and_matches_the_array(tmp_path):
    pixels = oct_pixels()
    volume = read_volume(write(oct_dataset(pixels), tmp_path / "oct.dcm"))

    description = json.loads(json.dumps(describe_volume(volume)))

    assert description["shape"] == [FRAMES, ROWS, COLUMNS]
    assert description["dtype"] == "uint8"
    assert description["min"] == int(pixels.min()) and description["max"] == int(pixels.max())
    assert description["mean"] == pytest.approx(float(pixels.mean()))
    assert description["meta"]["spacing"] == pytest.approx([0.12, 0.0039, 0.0057])
    assert description["meta"]["participant_id"] == "1001"


def test_non_finite_pixels_are_refused_and_counted(tmp_path):
    data = np.array([[[1.0, np.nan], [3.0, np.inf]]], np.float32)
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(OctReadError) as error:
        read_volume(tmp_path / "nan.npy")
    assert_names(error, str(tmp_path / "nan.npy"), "2 of 4 pixel values are NaN or infinite")


def test_describe_volume_skips_nan():
    data = np.array([[[1.0, np.nan], [3.0, np.inf]]], np.float32)
    description = describe_volume(Volume(array=data))
    assert (description["min"], description["max"], description["mean"]) == (1.0, 3.0, 2.0)
    json.dumps(description, allow_nan=False)
