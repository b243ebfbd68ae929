"""A 3D image that keeps its geometry, and its NIfTI / NRRD / MHA input-output.

Conventions (one place for the whole project):

- ``Volume.array`` is indexed ``(x, y, z)`` = ``(i, j, k)``, i.e. the same order as nibabel and MONAI's
  channel-first tensors without the channel (``(C, H, W, D)``); SimpleITK's ``(z, y, x)`` arrays are transposed here.
- Geometry is ITK's: ``spacing`` (mm, per axis i, j, k), ``origin`` (mm, LPS world coordinates of voxel (0, 0, 0))
  and ``direction`` (3x3, LPS, column n = world direction of axis n). NIfTI files store the RAS equivalent; SimpleITK
  converts, so a volume read from any format shows the same anatomy in Slicer and SimpleITK.
- Writes are atomic: the file appears complete or not at all.
- Reads refuse truncated files by name ("truncated: expected N bytes of voxel data, found M"): MHA/MHD with
  ``ElementDataFile = LOCAL``, NIfTI (``.nii`` by size, ``.nii.gz`` by the gzip stream) and NRRD with attached raw
  or gzip data (see :mod:`CCELLACore.data.truncation`), which ITK would otherwise report as "No such file or
  directory" (MHA), in NRRD's own words, or read with missing voxels (``.nii.gz``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VolumeError
from ..fileio import atomic_path
from .truncation import size_problem

__all__ = [
    "Volume",
    "read_volume",
    "read_metadata",
    "read_header",
    "write_volume",
    "volume_format",
    "SUPPORTED_SUFFIXES",
    "SYNTHETIC_KEY",
    "NIFTI_DESCRIP_KEY",
    "make_grid",
    "resample_to_grid",
    "single_itk_thread",
]

#: File suffixes understood by :func:`read_volume` / :func:`write_volume`.
SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Metadata key that marks synthetic output in NRRD and MHA headers (and, through ``descrip``, in NIfTI).
SYNTHETIC_KEY = "CCELLA_synthetic"
#: ITK maps this key to the NIfTI header's 80-character ``descrip`` field.
NIFTI_DESCRIP_KEY = "ITK_FileNotes"


def volume_format(path: str | Path) -> str:
    """Return ``"nifti"``, ``"nrrd"`` or ``"meta"`` for a path, or raise :class:`VolumeError`."""
    name = str(path).lower()
    if name.endswith((".nii.gz", ".nii")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "meta"
    raise VolumeError(path, f"unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")


@dataclass
class Volume:
    """A 3D array with its physical geometry.

    Args:
        array: voxel values, shape (X, Y, Z).
        spacing: voxel size in mm along i, j, k.
        origin: LPS position (mm) of the centre of voxel (0, 0, 0).
        direction: 3x3 LPS direction cosines; column n is the world direction of array axis n.
        metadata: free key/value strings written to NRRD/MHA headers (and ``descrip`` for NIfTI).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (X, Y, Z), got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin must have 3 values")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS mm (what nibabel calls the affine)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    @property
    def physical_extent(self) -> tuple[float, float, float]:
        """Field of view in mm along each array axis."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def same_grid(self, other: "Volume", atol: float = 1e-3) -> bool:
        """True when both volumes have the same shape, spacing, origin and direction (within ``atol`` mm)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )

    def with_array(self, array: np.ndarray, **metadata: str) -> "Volume":
        """A new volume on the same grid with other voxel values (and extra metadata)."""
        return Volume(np.asarray(array), self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.array).all())

    def __repr__(self) -> str:
        code = _orientation_code(self.direction)
        return (
            f"Volume(shape={self.shape}, spacing={tuple(round(s, 4) for s in self.spacing)}, orientation={code}, "
            f"dtype={self.array.dtype}, {self.array.nbytes / 2**20:.1f} MiB)"
        )

    # --- SimpleITK bridge -------------------------------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.flatten()))
        for key, value in self.metadata.items():
            image.SetMetaData(str(key), str(value))
        return image

    @classmethod
    def from_sitk(cls, image) -> "Volume":
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        metadata = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
        return cls(
            array=np.ascontiguousarray(array),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            metadata=metadata,
        )


def _orientation_code(direction: np.ndarray) -> str:
    """Three-letter LPS-style code of the axes' dominant directions, e.g. 'LPS' or 'RAS'."""
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    code = ""
    for n in range(3):
        axis = direction[:, n]
        m = int(np.argmax(np.abs(axis)))
        code += letters[m][0] if axis[m] > 0 else letters[m][1]
    return code


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else "unknown error"


def read_header(path: str | Path):
    """Read and check only the header of a 3D NIfTI, NRRD or MHA file (no voxels are decoded).

    Returns:
        the ``SimpleITK.ImageFileReader`` with its image information read.

    Raises:
        VolumeError: unsupported suffix, missing file, unreadable header, not a 3D single-channel volume (a 2D
            slice, a single-slice volume or a 4D series; a 4D NIfTI holding one volume counts as 3D), or a truncated
            MHA/NIfTI/NRRD file ("truncated: expected N bytes of voxel data, found M"; checked from sizes, and for
            ``.nii.gz`` from the gzip trailer, decompressing only when it disagrees).
    """
    import SimpleITK as sitk

    path = Path(path)
    volume_format(path)
    if not path.is_file():
        raise VolumeError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(path, size_problem(path) or f"unreadable image ({_last_line(exc)})") from None
    dim, size, components = reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents()
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]
    if dim != 3 or components != 1 or size[2] < 2:
        raise VolumeError(path, f"not a 3D single-channel volume ({dim}D of size {tuple(size)}, "
                                f"{components} component(s))")
    truncated = size_problem(path)
    if truncated:
        raise VolumeError(path, truncated)
    return reader


def read_volume(path: str | Path, *, check_finite: bool = True) -> Volume:
    """Read a 3D NIfTI, NRRD or MHA file.

    Raises:
        VolumeError: the file is missing, corrupt, truncated, not 3D (a 2D slice or a 4D series), or has NaN/Inf
            voxels (when ``check_finite``); the message names the file.
    """
    path = Path(path)
    reader = read_header(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:  # SimpleITK reports corrupt files as RuntimeError
        raise VolumeError(path, size_problem(path) or f"unreadable image ({_last_line(exc)})") from None
    if image.GetDimension() == 4:  # a 4D NIfTI with a single volume along t (read_header checked) is 3D data
        image = image[:, :, :, 0]
    volume = Volume.from_sitk(image)
    volume.metadata = _portable_metadata(volume.metadata, volume_format(path))
    if check_finite and np.issubdtype(volume.array.dtype, np.floating):
        bad = int((~np.isfinite(volume.array)).sum())
        if not bad and volume_format(path) == "nifti":
            bad = _nifti_non_finite(path)
        if bad:
            raise VolumeError(path, f"{bad} NaN/Inf voxel(s)")
    return volume


def _portable_metadata(metadata: dict[str, str], fmt: str) -> dict[str, str]:
    """The metadata worth keeping from a file: free key/values and the description, not the format's own header
    fields (NIfTI ``dim[0]``, ``qform_code``, NRRD ``NRRD_space``, ITK bookkeeping), which are junk, and warnings,
    in another format's header. A NIfTI's ``descrip`` starting with "SYNTHETIC" restores the synthetic mark."""
    descrip = (metadata.get(NIFTI_DESCRIP_KEY, "") or metadata.get("descrip", "")).strip()
    if fmt == "nifti":
        kept = {}
    else:
        kept = {k: v for k, v in metadata.items() if v.strip() and not k.startswith(("ITK_", "NRRD_", "Modality"))}
    if descrip:
        kept[NIFTI_DESCRIP_KEY] = descrip
    if descrip.upper().startswith("SYNTHETIC"):
        kept[SYNTHETIC_KEY] = "true"
    return kept


def _nifti_non_finite(path: Path) -> int:
    """NaN/Inf voxels of a floating-point NIfTI file as stored.

    ITK's NIfTI reader turns NaN into 0 (seen with SimpleITK 2.5), so the array read above cannot show them; nibabel
    reads the stored values.
    """
    import nibabel as nib

    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(str(path))
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return 0
        return int((~np.isfinite(np.asarray(image.dataobj))).sum())
    except (EOFError, OSError, ValueError, zlib.error, ImageFileError) as exc:  # read_header checked the length
        raise VolumeError(path, f"unreadable image ({_last_line(exc)})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata :func:`read_volume` would give, from the header only (no voxels are decoded)."""
    path = Path(path)
    fmt = volume_format(path)
    reader = read_header(path)
    return _portable_metadata({k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}, fmt)


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` atomically (temporary file + rename) as NIfTI, NRRD or MHA, chosen by suffix.

    A short write (full disk) is an error and leaves any earlier file at ``path`` as it was.
    NIfTI keeps its description in the 80-character ``descrip`` field: the ``ITK_FileNotes`` metadata entry, or
    ``"SYNTHETIC ..."`` when the volume is marked synthetic.
    """
    import SimpleITK as sitk

    path = Path(path)
    fmt = volume_format(path)
    if str(path).lower().endswith((".nhdr", ".mhd")):
        # Detached headers name their data file, which a temporary name would break: write single files only.
        raise VolumeError(path, "write .nrrd, .mha or .nii.gz (single-file formats)")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk()
    if fmt == "nifti" and volume.metadata.get(SYNTHETIC_KEY, "").lower() == "true" and NIFTI_DESCRIP_KEY not in volume.metadata:
        image.SetMetaData(NIFTI_DESCRIP_KEY, "SYNTHETIC image generated by CCELLA++ - not a real patient")
    suffix = next(s for s in SUPPORTED_SUFFIXES if str(path).lower().endswith(s))
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
            # ITK's NIfTI writer only prints a short write (full disk, file size limit): check the size before the
            # rename; on a really full disk the file can be left empty, header and all.
            short = "nothing written" if tmp.stat().st_size == 0 else size_problem(tmp)
            if short:
                short = short.removeprefix("unreadable image (").removesuffix(")")
                raise VolumeError(path, f"cannot write image (incomplete file, {short}; disk full?)")
    except RuntimeError as exc:
        raise VolumeError(path, f"cannot write image ({str(exc).strip().splitlines()[-1]})") from None
    return path


def single_itk_thread() -> None:
    """One ITK thread in this process: for worker processes of a pool that already uses the cores."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def make_grid(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    center_lps: tuple[float, float, float] | np.ndarray,
    direction: np.ndarray | None = None,
) -> Volume:
    """An all-zero volume of ``size`` voxels at ``spacing`` whose centre lies at ``center_lps`` (a target grid)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    half = (np.asarray(size, float) - 1) / 2 * np.asarray(spacing, float)
    origin = np.asarray(center_lps, float) - direction @ half
    return Volume(np.zeros(tuple(int(s) for s in size), np.float32), tuple(spacing), tuple(origin), direction)


def resample_to_grid(
    volume: Volume,
    reference: Volume,
    *,
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape, spacing, origin, direction), in physical space.

    Args:
        interpolation: ``"linear"`` for images, ``"nearest"`` for masks and label maps, ``"bspline"`` for smooth
            upsampling (clipped to the input range so it never invents negative ADC).
        default_value: value outside ``volume``'s field of view.

    Returns:
        A volume on the reference grid with ``volume``'s dtype (float32 for linear/bspline images) and metadata.
    """
    import SimpleITK as sitk

    methods = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be one of {sorted(methods)}, got {interpolation!r}")
    src = volume.to_sitk()
    if interpolation != "nearest":
        src = sitk.Cast(src, sitk.sitkFloat32)
    ref = reference.to_sitk()
    out = sitk.Resample(src, ref, sitk.Transform(), methods[interpolation], float(default_value), src.GetPixelID())
    result = Volume.from_sitk(out)
    if interpolation == "bspline":
        result.array = np.clip(result.array, float(volume.array.min()), float(volume.array.max()))
    result.metadata = dict(volume.metadata)
    return result
