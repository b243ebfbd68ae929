"""Volume geometry and NIfTI / NRRD / MHA round trips."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from CCELLACore.data.volume import (
    SYNTHETIC_KEY,
    Volume,
    make_grid,
    read_metadata,
    read_volume,
    resample_to_grid,
    write_volume,
)
from CCELLACore.errors import VolumeError

FORMATS = ["nii.gz", "nii", "nrrd", "mha"]


def _oblique_volume(dtype=np.float32) -> Volume:
    rng = np.random.default_rng(0)
    angle = np.deg2rad(7.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    array = (rng.random((9, 7, 5)) * 1000).astype(dtype)
    return Volume(array, spacing=(0.5, 0.6, 3.0), origin=(12.5, -40.0, 7.25), direction=rot)


@pytest.mark.parametrize("ext", FORMATS)
def test_round_trip_keeps_voxels_and_geometry(tmp_path, ext):
    vol = _oblique_volume()
    path = write_volume(vol, tmp_path / f"v.{ext}")
    back = read_volume(path)
    assert back.shape == (9, 7, 5)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    assert back.same_grid(vol)


@pytest.mark.parametrize("ext", FORMATS)
def test_integer_masks_round_trip(tmp_path, ext):
    vol = _oblique_volume()
    mask = vol.with_array((vol.array > 500).astype(np.uint8) * 2)
    back = read_volume(write_volume(mask, tmp_path / f"m.{ext}"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.array)


def test_nifti_affine_is_the_ras_equivalent_of_lps(tmp_path):
    """nibabel (RAS) and our LPS geometry describe the same anatomy."""
    vol = _oblique_volume()
    write_volume(vol, tmp_path / "v.nii.gz")
    img = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(img.affine, vol.affine_ras, atol=1e-5)
    # nibabel's array is (i, j, k) like ours.
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array)


def test_world_point_maps_to_same_voxel_in_sitk(tmp_path):
    vol = _oblique_volume()
    write_volume(vol, tmp_path / "v.mha")
    image = sitk.ReadImage(str(tmp_path / "v.mha"))
    ijk = (3, 4, 2)
    world = vol.affine_lps @ np.array([*ijk, 1.0])
    assert image.TransformPhysicalPointToIndex(tuple(world[:3])) == ijk


@pytest.mark.parametrize("ext", ["nii.gz", "nrrd", "mha"])
def test_synthetic_mark_survives_in_metadata(tmp_path, ext):
    vol = _oblique_volume()
    vol.metadata[SYNTHETIC_KEY] = "true"
    write_volume(vol, tmp_path / f"s.{ext}")
    if ext == "nii.gz":
        header = nib.load(tmp_path / "s.nii.gz").header
        assert b"SYNTHETIC" in bytes(header["descrip"])
    else:
        assert read_volume(tmp_path / f"s.{ext}").metadata[SYNTHETIC_KEY] == "true"


def test_missing_corrupt_nan_2d_4d_are_named_errors(tmp_path):
    with pytest.raises(VolumeError, match="file not found") as err:
        read_volume(tmp_path / "absent.nii.gz")
    assert "absent.nii.gz" in str(err.value)

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(VolumeError, match="corrupt.nii.gz"):
        read_volume(corrupt)

    nan = _oblique_volume()
    nan.array[1, 2, 3] = np.nan
    nan.array[0, 0, 0] = np.inf
    write_volume(nan, tmp_path / "nan.nrrd")
    with pytest.raises(VolumeError, match="2 NaN/Inf"):
        read_volume(tmp_path / "nan.nrrd")
    assert not np.isfinite(read_volume(tmp_path / "nan.nrrd", check_finite=False).array).all()

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "slice.mha"))
    with pytest.raises(VolumeError, match="3D"):
        read_volume(tmp_path / "slice.mha")

    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "series.nii.gz"))
    with pytest.raises(VolumeError, match="4D"):
        read_volume(tmp_path / "series.nii.gz")

    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(tmp_path / "image.png")


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    vol = _oblique_volume()
    write_volume(vol, tmp_path / "a.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]
    with pytest.raises(VolumeError):
        write_volume(vol, tmp_path / "a.mhd")  # detached header: refused, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_resample_keeps_world_positions():
    """A bright voxel resampled to a finer grid stays at the same world position."""
    vol = Volume(np.zeros((10, 10, 6), np.float32), spacing=(2.0, 2.0, 3.0), origin=(-9.0, -9.0, -7.5))
    vol.array[6, 3, 2] = 100.0
    world = vol.affine_lps @ np.array([6, 3, 2, 1.0])
    grid = make_grid((20, 20, 18), (1.0, 1.0, 1.0), center_lps=(0.0, 0.0, 0.0))
    out = resample_to_grid(vol, grid, interpolation="linear")
    peak = np.unravel_index(np.argmax(out.array), out.shape)
    peak_world = out.affine_lps @ np.array([*peak, 1.0])
    assert np.linalg.norm(peak_world[:3] - world[:3]) <= 1.0 + 1e-6
    nearest = resample_to_grid(vol.with_array((vol.array > 0).astype(np.uint8)), grid, interpolation="nearest")
    assert nearest.array.dtype == np.uint8 and set(np.unique(nearest.array)) <= {0, 1}


def test_make_grid_centre():
    grid = make_grid((4, 6, 8), (0.5, 1.0, 2.0), center_lps=(10.0, 20.0, 30.0))
    centre = grid.affine_lps @ np.array([1.5, 2.5, 3.5, 1.0])
    np.testing.assert_allclose(centre[:3], (10.0, 20.0, 30.0))


def test_nan_in_nifti_is_caught_although_itk_reads_it_as_zero(tmp_path):
    array = np.ones((4, 4, 4), np.float32)
    array[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeError, match="nan.nii.gz: 1 NaN/Inf"):
        read_volume(tmp_path / "nan.nii.gz")


def test_format_header_fields_are_not_carried_between_formats(tmp_path):
    vol = _oblique_volume()
    vol.metadata["CCELLA_note"] = "kept"
    back = read_volume(write_volume(vol, tmp_path / "a.nii.gz"))
    assert not any(k.startswith(("dim[", "qform", "pixdim")) for k in back.metadata)
    back = read_volume(write_volume(vol, tmp_path / "a.nrrd"))
    assert back.metadata == {"CCELLA_note": "kept"}


def test_read_metadata_reads_the_header_only(tmp_path):
    vol = _oblique_volume()
    vol.metadata["CCELLA_note"] = "kept"
    for ext in ("nrrd", "mha"):
        path = write_volume(vol, tmp_path / f"h.{ext}")
        assert read_metadata(path) == read_volume(path).metadata == {"CCELLA_note": "kept"}
    vol.metadata[SYNTHETIC_KEY] = "true"
    assert read_metadata(write_volume(vol, tmp_path / "h.nii.gz"))[SYNTHETIC_KEY] == "true"
    with pytest.raises(VolumeError, match="not found"):
        read_metadata(tmp_path / "none.nrrd")


@pytest.mark.parametrize("name, compress", [("t.mha", True), ("t.mha", False), ("t.nii.gz", True), ("t.nii", False)])
def test_truncated_file_is_named_with_the_bytes_it_lacks(tmp_path, name, compress):
    from CCELLACore.data.volume import read_header

    volume = _oblique_volume()  # 9 x 7 x 5 float32: 1260 bytes of voxels
    path = write_volume(volume, tmp_path / name, compress=compress)
    whole = path.read_bytes()
    assert np.array_equal(read_volume(path).array, volume.array)  # the intact file reads
    path.write_bytes(whole[: len(whole) * 2 // 3])
    for read in (read_header, read_volume):  # the header check alone already tells (no voxels decoded)
        with pytest.raises(VolumeError) as err:
            read(path)
        message = str(err.value)
        match = re.search(r"truncated: expected (\d+) bytes of voxel data, found (\d+)", message)
        assert match and str(path) in message and "unreadable image" in message, message
        assert int(match.group(2)) < int(match.group(1))
        if not (name.endswith("mha") and compress):  # compressed MHA: the sizes are CompressedDataSize's
            assert int(match.group(1)) == 1260
        assert "No such file or directory" not in message
    # Cut inside the header; and, for .nii.gz, only the gzip trailer (every voxel decodes, the checksum is lost).
    path.write_bytes(whole[:120])
    with pytest.raises(VolumeError, match=r"unreadable image"):
        read_volume(path)
    if name.endswith(".gz"):
        path.write_bytes(whole[:-6])
        with pytest.raises(VolumeError, match=r"truncated: the gzip stream ends early"):
            read_volume(path)
        # A second gzip member or zero padding after the stream is not a truncation.
        raw = gzip.decompress(whole)
        path.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]) + b"\0" * 8)
        assert np.array_equal(read_volume(path).array, volume.array)
