"""Reading and writing scans: the one place that touches NIfTI, NRRD, MetaImage and DICOM files.

Contract
--------
* **Axis order.** ``Volume.data`` is a 3-D NumPy array indexed ``[i, j, k]`` — the voxel index order
  of nibabel. A file read through SimpleITK (whose arrays are ``[k, j, i]``) is transposed, so the
  same scan stored as NIfTI and as NRRD gives the same array.
* **Affine.** ``Volume.affine`` is the 4×4 matrix mapping a voxel index ``(i, j, k, 1)`` to world
  coordinates in millimetres in **RAS+** (x grows towards the patient's Right, y Anterior,
  z Superior; nibabel's convention). For NIfTI it is nibabel's
  ``img.affine`` (the sform when its code is set, else the qform). ITK stores geometry in **LPS+**
  (``world_LPS = D·diag(spacing)·index + origin``); we convert with ``RAS = diag(−1, −1, 1)·LPS``::

      affine[:3, :3] = F · D · diag(spacing),   affine[:3, 3] = F · origin,   F = diag(−1, −1, 1)

  Writing applies the inverse conversion, so a round trip through any format keeps the geometry.
* **Spacing** is the length of each affine column (mm per voxel step along i, j, k).
* **Dtypes.** ``kind="image"`` → float32; ``kind="mask"`` → uint8 with values {0, 1};
  ``kind="labels"`` → int32 (any integer values).
* **Validated on read** (every failure is a :class:`SpirsInputError` naming the file): the path
  exists; the format is known; the header can be read; the image is 3-D (a 4-D file holding one
  volume is squeezed; several volumes are refused); it has one component per voxel; it is not larger
  than :data:`MAX_AXIS` voxels along any axis or :data:`MAX_VOXELS` in total (checked from the header,
  *before* the voxel data are loaded); the spacing is positive, finite and at most
  :data:`MAX_SPACING_MM`; the affine is finite and invertible; the data can be decoded (corrupt or
  truncated files → ``cannot read: …``); all voxels are finite; an image is not all zero; a mask
  holds only 0 and 1; labels are integers.
* **Writing** is atomic (:func:`spirs_tf.atomic.atomic_path`) and never overwrites a path listed in
  ``protect``. The format follows the extension: ``.nii``/``.nii.gz`` through nibabel (qform and
  sform both set, code 1 = scanner), ``.nrrd``/``.seg.nrrd``/``.mha`` through SimpleITK.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from spirs_tf.atomic import atomic_path
from spirs_tf.errors import SpirsInputError

#: Largest accepted size along one axis, in voxels.
MAX_AXIS = 512
#: Largest accepted number of voxels.
MAX_VOXELS = 200_000_000
#: Largest accepted voxel spacing in mm (anything coarser is not a brain MRI).
MAX_SPACING_MM = 20.0

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".mha", ".mhd")
WRITE_ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".mha")
KINDS = ("image", "mask", "labels")

#: RAS ↔ LPS: flip the first two world axes (the matrix is its own inverse).
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D scan with its geometry.

    Attributes:
        data: array ``[i, j, k]``.
        affine: 4×4 float64, voxel index → RAS+ world mm.
        path: the file it was read from (``None`` for arrays made in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``i, j, k`` (the affine's column norms)."""
        return np.sqrt((np.asarray(self.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _suffix(path: str) -> str:
    name = os.path.basename(path.rstrip("/\\")).lower()
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return os.path.splitext(name)[1]


@contextlib.contextmanager
def sitk_path(path: str | os.PathLike):
    """Yield a name under which SimpleITK can open ``path``.

    SimpleITK passes paths to C++ as UTF-8; a path that is not valid UTF-8 (a folder named with
    Latin-1 bytes, seen by Python as lone surrogates) makes it *abort the process*. Such a path is
    reached through a symbolic link in a temporary folder instead: a link to its folder when the
    file name itself is UTF-8 (so sidecar files such as ``.mhd`` → ``.raw`` and new files written
    there resolve), else a link to the file or folder itself. Other paths are yielded unchanged.
    """
    path = os.fspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield path
        return
    folder, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix="spirs-itk-")
    try:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            alias = os.path.join(tmp, "item" + _suffix(name))
            os.symlink(os.path.abspath(path), alias)
        else:
            os.symlink(folder, os.path.join(tmp, "dir"))
            alias = os.path.join(tmp, "dir", name)
        yield alias
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the links only, never what they point to


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_volume(path: str | os.PathLike, kind: str = "image") -> Volume:
    """Read one 3-D scan (see the module docstring for the contract).

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.seg.nrrd``/``.mha``/``.mhd`` file, or a folder
            holding one DICOM series.
        kind: ``"image"`` (float32, must not be all zero), ``"mask"`` (binary {0, 1}, returned as
            uint8) or ``"labels"`` (integer values, returned as int32).

    Returns:
        :class:`Volume` with ``path`` set to the given path.

    Raises:
        SpirsInputError: for every problem listed in the module docstring; the message names the file.
        ValueError: for an unknown ``kind`` (a programming error, not user input).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpirsInputError("file not found", path)
    if os.path.isdir(path):
        data, affine = _read_itk(path, dicom=True)
    else:
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            data, affine = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            data, affine = _read_itk(path, dicom=False)
        else:
            raise SpirsInputError(
                f"unsupported file type {suffix!r}; use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd), "
                "MetaImage (.mha, .mhd) or a folder with one DICOM series", path)
    return Volume(_check_values(data, kind, path), affine, path)


def _check_header(shape: tuple[int, ...], affine: np.ndarray, path: str) -> tuple[int, int, int]:
    """Validate dimensionality, size and geometry from the header; return the 3-D shape."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise SpirsInputError(f"not a 3-D image: shape {shape}", path)
    extra = shape[3:]
    if len(extra) == 1 and extra[0] > 1:
        raise SpirsInputError(f"4-D image with {extra[0]} volumes; give a single 3-D volume", path)
    if any(n != 1 for n in extra):
        raise SpirsInputError(f"not a 3-D image: shape {shape}", path)
    shape3 = shape[:3]
    if min(shape3) < 1:
        raise SpirsInputError(f"empty image: shape {shape3}", path)
    if max(shape3) > MAX_AXIS or int(np.prod(shape3, dtype=np.int64)) > MAX_VOXELS:
        raise SpirsInputError(
            f"image too large: shape {shape3} (at most {MAX_AXIS} voxels per axis and {MAX_VOXELS:.0e} "
            "in total); crop or downsample it first", path)
    if not np.all(np.isfinite(affine)):
        raise SpirsInputError("the voxel-to-world affine holds NaN or infinite values", path)
    _check_spacing(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), path)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise SpirsInputError("the voxel-to-world affine is singular (collinear voxel axes)", path)
    return shape3


def _check_spacing(spacing, path: str) -> None:
    spacing = np.asarray(spacing, dtype=np.float64)
    bad = ~np.isfinite(spacing) | (spacing <= 0) | (spacing > MAX_SPACING_MM)
    if np.any(bad):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise SpirsInputError(
            f"implausible voxel spacing ({shown}) mm; each must be > 0 and <= {MAX_SPACING_MM:g} mm", path)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (nibabel's can span several)."""
    return " ".join(str(exc).split())


def _stored_pixdim(path: str) -> np.ndarray | None:
    """Voxel size ``pixdim[1:4]`` as stored when the affine comes from it (``sform_code`` 0), else ``None``.

    nibabel's loader silently replaces a 0 pixdim by 1 and a negative one by its absolute value (a
    header with no real geometry would then pass as 1 mm), so the raw header is read first.
    """
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(path) as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
        if int(hdr["sizeof_hdr"]) != 348 or int(hdr["sform_code"]) != 0 or int(hdr["dim"][0]) < 3:
            return None  # NIfTI-2, the sform (not pixdim) gives the geometry, or not 3-D (checked later)
        return np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    except Exception:  # unreadable: nib.load below reports it
        return None


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    pixdim = _stored_pixdim(path)
    if pixdim is not None:
        _check_spacing(pixdim, path)
    try:
        img = nib.load(path)
        shape = img.header.get_data_shape()
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a bad header
        raise SpirsInputError(f"cannot read: {_one_line(exc)}", path) from exc
    shape3 = _check_header(shape, affine, path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # zlib.error, EOFError, OSError, OverflowError (absurd vox_offset), ...
        raise SpirsInputError(f"cannot read: {type(exc).__name__}: {_one_line(exc)}", path) from exc
    return np.asarray(data).reshape(shape3), affine


def _itk_affine(direction, spacing, origin, ndim: int) -> np.ndarray:
    """ITK LPS geometry (first three axes) → 4×4 RAS affine."""
    d = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    s = np.asarray(spacing, dtype=np.float64)[:3]
    o = np.asarray(origin, dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ d @ np.diag(s)
    affine[:3, 3] = _LPS_RAS @ o
    return affine


def sitk_to_array_affine(image) -> tuple[np.ndarray, np.ndarray]:
    """A ``SimpleITK.Image`` (3-D, or 4-D with one volume) → (array ``[i, j, k]``, RAS affine)."""
    import SimpleITK as sitk

    ndim = image.GetDimension()
    affine = _itk_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin(), ndim)
    array = sitk.GetArrayFromImage(image)  # [..., k, j, i]
    array = array.reshape(array.shape[-3:]) if ndim > 3 else array
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine


def _read_itk(path: str, dicom: bool) -> tuple[np.ndarray, np.ndarray]:
    with sitk_path(path) as alias:
        return _read_itk_at(alias, path, dicom)


def _read_itk_at(alias: str, path: str, dicom: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read through SimpleITK from ``alias`` (:func:`sitk_path`); messages name ``path``."""
    import SimpleITK as sitk

    try:
        if dicom:
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(alias)
            if not ids:
                raise SpirsInputError("folder holds no DICOM series (and is not an image file)", path)
            if len(ids) > 1:
                raise SpirsInputError(
                    f"folder holds {len(ids)} DICOM series ({', '.join(ids)}); give a folder with one", path)
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(alias, ids[0])
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            size = tuple(info.GetSize()[:2]) + (len(files),)
            ndim, components = 3, info.GetNumberOfComponents()
        else:
            info = sitk.ImageFileReader()
            info.SetFileName(alias)
            info.ReadImageInformation()
            size, ndim, components = tuple(info.GetSize()), info.GetDimension(), info.GetNumberOfComponents()
            header_affine = _itk_affine(info.GetDirection(), info.GetSpacing(), info.GetOrigin(), ndim) \
                if ndim >= 3 else np.eye(4)
    except RuntimeError as exc:
        raise SpirsInputError(f"cannot read: {str(exc).strip().splitlines()[-1]}", path) from exc
    if components != 1:
        raise SpirsInputError(f"{components} components per voxel; give a scalar (single-channel) image", path)
    if dicom:
        _check_header(size, np.eye(4), path)  # geometry is checked below, after the series is read
    else:
        _check_spacing(info.GetSpacing()[:3], path)
        _check_header(size, header_affine, path)
    try:
        if dicom:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(alias)
    except RuntimeError as exc:
        raise SpirsInputError(f"cannot read: {str(exc).strip().splitlines()[-1]}", path) from exc
    data, affine = sitk_to_array_affine(image)
    if dicom:
        _check_header(data.shape, affine, path)
    return data, affine


def _check_values(data: np.ndarray, kind: str, path: str) -> np.ndarray:
    """Finite values; per-kind checks and dtype (see :func:`read_volume`)."""
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.number):
        raise SpirsInputError(f"unsupported voxel type {data.dtype}", path)
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        if np.iscomplexobj(data):
            raise SpirsInputError("complex-valued voxels are not supported", path)
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            raise SpirsInputError(f"{n_bad} voxel(s) are NaN or infinite", path)
    if kind == "image":
        if not np.any(data):
            raise SpirsInputError("image is all zero", path)
        image = data.astype(np.float32, copy=False)
        if not np.all(np.isfinite(image)):  # e.g. float64 after a huge scl_slope
            raise SpirsInputError(f"voxel values exceed the float32 range (largest magnitude "
                                  f"{float(np.max(np.abs(data))):.3g})", path)
        return image
    values = np.unique(data)
    if kind == "mask":
        other = values[(values != 0) & (values != 1)]
        if other.size:
            shown = ", ".join(f"{v:g}" for v in other[:5]) + (", …" if other.size > 5 else "")
            raise SpirsInputError(
                f"mask is not binary: it holds value(s) {shown} besides 0 and 1", path)
        return data.astype(np.uint8)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise SpirsInputError(f"label image holds non-integer value(s), e.g. {fractional[0]:g}", path)
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise SpirsInputError("label values do not fit in 32-bit integers", path)
    return data.astype(np.int32)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *,
                 protect=(), intent: str | None = None) -> None:
    """Write ``data`` with the RAS ``affine`` atomically; the format follows the extension.

    Args:
        path: ``.nii``/``.nii.gz`` (nibabel), ``.nrrd``/``.seg.nrrd``/``.mha`` (SimpleITK).
        data: ``[i, j, k]`` array. bool is stored as uint8, float64 as float32, int64 as int32;
            other dtypes are kept (uint8 masks, float32 images). A displacement field is
            ``(X, Y, Z, 3)`` or ``(X, Y, Z, 1, 3)`` with ``intent="vector"``: NIfTI stores it as
            5-D ``(X, Y, Z, 1, 3)`` with intent code *vector*, ITK formats as a 3-component image.
        affine: 4×4 voxel → RAS+ world mm.
        protect: paths that must never be overwritten (the run's inputs).
        intent: a NIfTI intent name (``"vector"``, ``"label"``, …) or ``None``.

    Raises:
        SpirsInputError: unsupported extension, or ``path`` is one of ``protect``.
        ValueError: wrong ``data``/``affine`` shapes (programming errors).
    """
    path = os.fspath(path)
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if intent == "vector":
        if data.ndim == 4 and data.shape[3] == 3:
            data = data[:, :, :, None, :]
        if data.ndim != 5 or data.shape[3:] != (1, 3):
            raise ValueError(f"a vector field must have shape (X, Y, Z, 3) or (X, Y, Z, 1, 3), got {data.shape}")
    elif data.ndim != 3:
        raise ValueError(f"data must be 3-D [i, j, k] (or a vector field with intent='vector'), got {data.shape}")
    data = _storage_dtype(data)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        writer = _write_nifti
    elif suffix in WRITE_ITK_SUFFIXES:
        writer = _write_itk
    else:
        raise SpirsInputError(
            f"cannot write {suffix or 'files without an extension'!r}; use .nii.gz, .nii, .nrrd, "
            ".seg.nrrd or .mha", path)
    protect = tuple(os.fspath(p) for p in protect if p is not None)
    with atomic_path(path, protect=protect) as tmp:
        writer(tmp, data, affine, intent)


def _storage_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype == np.float64 or data.dtype == np.float16:
        return data.astype(np.float32)
    if data.dtype == np.int64:
        return data.astype(np.int32)
    if data.dtype == np.uint64:
        return data.astype(np.uint32)
    return data


def _write_nifti(tmp: str, data: np.ndarray, affine: np.ndarray, intent: str | None) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        img.header.set_intent(intent)
    nib.save(img, tmp)


def _write_itk(tmp: str, data: np.ndarray, affine: np.ndarray, intent: str | None) -> None:
    import SimpleITK as sitk

    if data.ndim == 5:  # (X, Y, Z, 1, 3) vector field → ITK [k, j, i, 3]
        image = sitk.GetImageFromArray(np.ascontiguousarray(data[:, :, :, 0, :].transpose(2, 1, 0, 3)),
                                       isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (_LPS_RAS @ affine[:3, :3] @ np.diag(1.0 / spacing)).ravel()])
    image.SetOrigin([float(v) for v in _LPS_RAS @ affine[:3, 3]])
    with sitk_path(tmp) as alias:
        sitk.WriteImage(image, alias, True)


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when ``a`` and ``b`` have the same shape and affines equal within ``atol`` (mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=0.0, atol=atol)


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> None:
    """Raise :class:`SpirsInputError` naming both files unless :func:`same_grid` holds."""
    if same_grid(a, b, atol):
        return
    if a.shape != b.shape:
        detail = f"shape {a.shape} vs {b.shape}"
    else:
        diff = float(np.max(np.abs(np.asarray(a.affine) - np.asarray(b.affine))))
        detail = f"voxel-to-world affines differ by up to {diff:.4g} mm"
    raise SpirsInputError(f"not on the same voxel grid as {b.path or '<array>'}: {detail}", a.path or "<array>")
