"""Tests for spirs_tf.io: round trips, RAS/LPS conversion against SimpleITK, validation, atomic writes."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from spirs_tf import io as sio
from spirs_tf.errors import SpirsInputError
from spirs_tf.geometry import params_to_matrix
from spirs_tf.io import Volume, check_same_grid, read_volume, same_grid, sitk_to_array_affine, write_volume

SHAPE = (12, 14, 16)
SPACING = (0.9, 1.2, 2.0)


def oblique_affine(spacing=SPACING, angles=(0.3, -0.2, 0.5), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    rot = params_to_matrix([0, 0, 0, *angles, 1, 1, 1, 0, 0, 0, 0, 0, 0])[:, :3].astype(np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def image(rng):
    return (rng.random(SHAPE) * 100 + 1).astype(np.float32)


def no_temp_files(folder) -> bool:
    return not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.seg.nrrd", "scan.mha"])
def test_image_round_trip_keeps_data_spacing_orientation(tmp_path, image, name):
    affine = oblique_affine()
    write_volume(tmp_path / name, image, affine)
    vol = read_volume(tmp_path / name)
    assert vol.data.dtype == np.float32 and vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, image)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-5)
    assert vol.path == os.fspath(tmp_path / name)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.seg.nrrd"])
def test_mask_round_trip_is_uint8_binary(tmp_path, rng, name):
    mask = rng.random(SHAPE) > 0.7
    write_volume(tmp_path / name, mask, oblique_affine())
    vol = read_volume(tmp_path / name, kind="mask")
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, mask.astype(np.uint8))
    if name.endswith(".nii.gz"):
        assert nib.load(tmp_path / name).get_data_dtype() == np.uint8


def test_nifti_header_has_qform_and_sform(tmp_path, image):
    affine = oblique_affine()
    write_volume(tmp_path / "a.nii.gz", image, affine)
    img = nib.load(tmp_path / "a.nii.gz")
    q, qcode = img.get_qform(coded=True)
    s, scode = img.get_sform(coded=True)
    assert qcode == 1 and scode == 1
    np.testing.assert_allclose(q, affine, atol=1e-5)
    np.testing.assert_allclose(s, affine, atol=1e-5)


def test_nifti_then_nrrd_gives_same_ras_affine_and_array(tmp_path, image):
    """A NIfTI written by nibabel itself, re-saved as NRRD, reads back identically."""
    affine = oblique_affine()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "ref.nii.gz")
    from_nifti = read_volume(tmp_path / "ref.nii.gz")
    write_volume(tmp_path / "copy.nrrd", from_nifti.data, from_nifti.affine)
    from_nrrd = read_volume(tmp_path / "copy.nrrd")
    np.testing.assert_array_equal(from_nrrd.data, from_nifti.data)
    np.testing.assert_allclose(from_nrrd.affine, from_nifti.affine, atol=1e-6)


def test_itk_geometry_matches_nibabel_on_the_same_file(tmp_path, image):
    """Brute-force reference: SimpleITK's own voxel→LPS mapping, flipped to RAS, equals nibabel's affine."""
    affine = oblique_affine()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "ref.nii.gz")
    itk = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))
    array, itk_affine = sitk_to_array_affine(itk)
    np.testing.assert_array_equal(array, image)
    np.testing.assert_allclose(itk_affine, affine, atol=1e-5)
    for index in [(0, 0, 0), (3, 4, 5), (11, 13, 15)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(index))
        ras = (affine @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-4)
        assert itk.GetPixel(*index) == image[index]
    # and the NRRD we write is read by SimpleITK with the same geometry
    write_volume(tmp_path / "b.nrrd", image, affine)
    itk_nrrd = sitk.ReadImage(str(tmp_path / "b.nrrd"))
    lps = np.array(itk_nrrd.TransformIndexToPhysicalPoint((3, 4, 5)))
    np.testing.assert_allclose(lps * [-1, -1, 1], (affine @ [3, 4, 5, 1])[:3], atol=1e-4)


def test_dicom_series_folder(tmp_path, rng):
    arr = rng.integers(1, 1000, (6, 7, 5)).astype(np.int16)
    affine = oblique_affine(angles=(0.2, -0.1, 0.3))
    lps_dir = np.diag([-1.0, -1, 1]) @ affine[:3, :3] @ np.diag(1 / np.array(SPACING))
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing(SPACING)
    img.SetOrigin((np.diag([-1.0, -1, 1]) @ affine[:3, 3]).tolist())
    img.SetDirection(lps_dir.ravel().tolist())
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    orient = "\\".join(str(v) for v in (*lps_dir[:, 0], *lps_dir[:, 1]))
    for k in range(arr.shape[2]):
        s = img[:, :, k]
        for tag, value in [("0020|000e", uid + ".2"), ("0020|000d", uid + ".3"), ("0008|0060", "MR"),
                           ("0020|0037", orient), ("0020|0013", str(k)), ("0028|0030", "1.2\\0.9"),
                           ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(s)
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.data, arr)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)


def test_vector_field_intent(tmp_path, rng):
    dvf = rng.normal(size=SHAPE + (3,)).astype(np.float32)
    write_volume(tmp_path / "dvf.nii.gz", dvf, oblique_affine(), intent="vector")
    img = nib.load(tmp_path / "dvf.nii.gz")
    assert img.shape == SHAPE + (1, 3)
    assert img.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, :, 0, :], dvf)
    write_volume(tmp_path / "dvf.mha", dvf[:, :, :, None, :], oblique_affine(), intent="vector")
    itk = sitk.ReadImage(str(tmp_path / "dvf.mha"))
    assert itk.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0, 3), dvf)


def test_four_d_with_one_volume_is_squeezed(tmp_path, image):
    nib.save(nib.Nifti1Image(image[..., None], oblique_affine()), tmp_path / "a.nii.gz")
    vol = read_volume(tmp_path / "a.nii.gz")
    assert vol.shape == SHAPE and vol.data.ndim == 3
    np.testing.assert_array_equal(vol.data, image)


# ---------------------------------------------------------------------------------- validation
def expect_error(path, match, kind="image"):
    with pytest.raises(SpirsInputError, match=match) as info:
        read_volume(path, kind=kind)
    assert os.fspath(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.nii.gz", "file not found")


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    expect_error(tmp_path / "a.png", "unsupported file type")


def test_four_d_with_several_volumes(tmp_path, image):
    nib.save(nib.Nifti1Image(np.stack([image] * 3, -1), np.eye(4)), tmp_path / "a.nii.gz")
    expect_error(tmp_path / "a.nii.gz", "4-D image with 3 volumes; give a single 3-D volume")


def test_two_d_image(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((5, 6), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    expect_error(tmp_path / "a.nii.gz", "not a 3-D image")


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nrrd"])
def test_truncated_file(tmp_path, image, name):
    write_volume(tmp_path / name, image, oblique_affine())
    raw = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(raw[: len(raw) * 2 // 3])
    expect_error(tmp_path / name, "cannot read")


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii", "junk.nrrd", "junk.mha"])
def test_garbage_file(tmp_path, name):
    (tmp_path / name).write_bytes(gzip.compress(b"not an image") if name.endswith(".gz") else b"not an image")
    expect_error(tmp_path / name, "cannot read")


def test_nan_voxels(tmp_path, image):
    image[1, 2, 3] = np.nan
    image[2, 2, 3] = np.inf
    write_volume(tmp_path / "a.nii.gz", image, oblique_affine())
    expect_error(tmp_path / "a.nii.gz", "2 voxel\\(s\\) are NaN or infinite")


def test_implausible_spacing(tmp_path, image):
    nib.save(nib.Nifti1Image(image, np.diag([1.0, 25.0, 1.0, 1.0])), tmp_path / "a.nii.gz")
    expect_error(tmp_path / "a.nii.gz", r"implausible voxel spacing \(1, 25, 1\) mm")


@pytest.mark.parametrize("directions, match", [
    ("(1,0,0) (0,0,0) (0,0,1)", r"implausible voxel spacing \(1, 0, 1\)"),
    ("(1,0,0) (0,nan,0) (0,0,1)", "cannot read"),
])
def test_zero_spacing_in_nrrd_header(tmp_path, directions, match):
    """nibabel silently repairs zero pixdims, so a hand-written NRRD header carries the bad geometry."""
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 5 6\n"
              f"space directions: {directions}\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    (tmp_path / "z.nrrd").write_bytes(header.encode() + np.ones(120, "<f4").tobytes())
    expect_error(tmp_path / "z.nrrd", match)


def test_size_refused_from_header_before_loading(tmp_path):
    """The header says 600³ but the file holds no voxel data: the size error must come first."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((600, 600, 600))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    (tmp_path / "big.nii").write_bytes(hdr.binaryblock + b"\0" * 4)
    expect_error(tmp_path / "big.nii", "image too large")


def test_total_voxel_limit(tmp_path, image, monkeypatch):
    monkeypatch.setattr(sio, "MAX_VOXELS", 1000)
    write_volume(tmp_path / "a.nrrd", image, oblique_affine())
    expect_error(tmp_path / "a.nrrd", "image too large")


def test_all_zero_image(tmp_path):
    write_volume(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.float32), oblique_affine())
    expect_error(tmp_path / "a.nii.gz", "all zero")
    assert read_volume(tmp_path / "a.nii.gz", kind="mask").data.sum() == 0  # an empty mask is fine


def test_non_binary_mask_names_the_values(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 1, 1], mask[2, 2, 2], mask[3, 3, 3] = 1, 2, 255
    write_volume(tmp_path / "m.nii.gz", mask, oblique_affine())
    expect_error(tmp_path / "m.nii.gz", "mask is not binary: it holds value\\(s\\) 2, 255", kind="mask")
    labels = read_volume(tmp_path / "m.nii.gz", kind="labels")
    assert labels.data.dtype == np.int32 and set(np.unique(labels.data)) == {0, 1, 2, 255}


def test_labels_must_be_integers(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[1, 1, 1] = 0.5
    write_volume(tmp_path / "l.nii.gz", lab, oblique_affine())
    expect_error(tmp_path / "l.nii.gz", "non-integer", kind="labels")


# ---------------------------------------------------------------------------------- writing
def test_refuses_to_overwrite_protected_input(tmp_path, image):
    path = tmp_path / "input.nii.gz"
    write_volume(path, image, oblique_affine())
    before = path.read_bytes()
    with pytest.raises(SpirsInputError, match="refusing to overwrite an input file"):
        write_volume(path, image * 2, oblique_affine(), protect=(os.fspath(path),))
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_failed_write_leaves_no_partial_or_temp_file(tmp_path, image, monkeypatch):
    def half_then_fail(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sio.nib, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tmp_path / "out.nii.gz", image, oblique_affine())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_previous_file(tmp_path, image, monkeypatch):
    path = tmp_path / "out.nii.gz"
    write_volume(path, image, oblique_affine())
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(sio.nib, "save", fail)
    with pytest.raises(RuntimeError):
        write_volume(path, image * 2, oblique_affine())
    assert path.read_bytes() == before and no_temp_files(tmp_path)


def test_write_rejects_unknown_extension_and_bad_shapes(tmp_path, image):
    with pytest.raises(SpirsInputError, match="cannot write"):
        write_volume(tmp_path / "a.png", image, np.eye(4))
    with pytest.raises(ValueError, match="3-D"):
        write_volume(tmp_path / "a.nii.gz", image[..., None, None], np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        write_volume(tmp_path / "a.nii.gz", image, np.eye(3))


# ---------------------------------------------------------------------------------- grids
def test_same_grid_and_check_same_grid(image):
    a = Volume(image, oblique_affine(), "a.nii.gz")
    assert same_grid(a, Volume(image, oblique_affine() + 1e-5, "b.nii.gz"))
    shifted = oblique_affine()
    shifted[0, 3] += 0.5
    with pytest.raises(SpirsInputError, match=r"a\.nii\.gz: not on the same voxel grid as c\.nii\.gz.*0\.5"):
        check_same_grid(a, Volume(image, shifted, "c.nii.gz"))
    with pytest.raises(SpirsInputError, match=r"d\.nii\.gz: shape \(12, 14, 16\) vs \(12, 14, 15\)"):
        check_same_grid(a, Volume(image[..., :15], oblique_affine(), "d.nii.gz"))
    check_same_grid(a, a)
