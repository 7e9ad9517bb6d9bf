"""Tests of anymc3d.preprocessing (with its config, image reading, intensity and writing modules) and anymc3d.synthetic
against independent computations. Over 500 lines: one section per module of the preprocessing chain, whose
tests share the chain's fixtures."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from anymc3d import image_reading
from anymc3d import preprocessing as pp
from anymc3d.contract import image_stem
from anymc3d.errors import InputError
from anymc3d.image_reading import read_image
from anymc3d.image_writing import write_image_atomic
from anymc3d.intensity import normalize_intensity
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import choose_slice_axis, prepare, to_model_input
from anymc3d.synthetic import make_ct_volume, random_oblique_direction

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _image(array_kji, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(np.asarray(array_kji, dtype=np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _smooth(point):
    x, y, z = point
    return math.sin(0.11 * x) + math.cos(0.07 * y) + 0.05 * z + 0.002 * x * y


def _function_image(size, spacing, origin, direction):
    """An image holding f(physical point) at every voxel, computed voxel by voxel."""
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    values = np.empty(tuple(reversed(size)), dtype=np.float32)
    for k in range(size[2]):
        for j in range(size[1]):
            for i in range(size[0]):
                values[k, j, i] = _smooth(image.TransformIndexToPhysicalPoint((i, j, k)))
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def _flipped_permuted_direction():
    """Oblique (0.3 rad about (1, 1, 1)), with image axes reversed and permuted relative to LPS."""
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    small = np.eye(3) + math.sin(0.3) * cross + (1 - math.cos(0.3)) * cross @ cross  # Rodrigues
    permute_flip = np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=float)
    return tuple((small @ permute_flip).ravel())


DIRECTIONS = {
    "oblique": random_oblique_direction(3),
    "flipped": _flipped_permuted_direction(),
}


def _oriented(image, orientation):
    return image if orientation == "none" else sitk.DICOMOrient(image, orientation)


def _oriented_axis(image, oriented, axis):
    """Independently: the oriented IJK axis parallel to the input's IJK ``axis``."""
    d_in = np.asarray(image.GetDirection()).reshape(3, 3)
    d_out = np.asarray(oriented.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(d_out.T @ d_in[:, axis])))


def _slice_space(oriented, oriented_axis):
    """Slice-space layout: slice axis first, remaining axes in numpy (K, J, I) order."""
    return np.moveaxis(sitk.GetArrayFromImage(oriented), 2 - oriented_axis, 0)


def _assert_same_geometry(a, b, atol=1e-9):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ------------------------------------------------------------------------------------------
# slice axis and config
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, axis",
    [
        ((1, 1, 1), 2),
        ((1, 1, 3), 2),
        ((3, 1, 1), 0),
        ((2, 2, 1), 1),
        ((1, 5, 2), 1),
        ((0.7, 0.7, 0.7 * (1 + 1e-8)), 2),
        ((0.7 * (1 + 1e-8), 0.7, 0.7), 2),
        ((0.8, 0.8, 2.5), 2),
    ],
)
def test_choose_slice_axis(spacing, axis):
    assert choose_slice_axis(spacing) == axis


def test_config_json_round_trip():
    config = PreprocessConfig(
        input_size=112,
        slice_axis=1,
        num_slices=32,
        orientation="RAS",
        intensity="mri_percentile",
        window=None,
        percentiles=(1.0, 99.0),
        zscore_clip=2.5,
    )
    text = json.dumps(config.to_dict())
    back = PreprocessConfig.from_dict(json.loads(text))
    assert back == config
    assert back.percentiles == (1.0, 99.0)
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()
    assert all("help" in f.metadata for f in dataclasses.fields(PreprocessConfig))


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("input_size", 0),
        ("input_size", 2.5),
        ("slice_axis", 3),
        ("slice_axis", "z"),
        ("num_slices", 1),
        ("orientation", "LPX"),
        ("orientation", "LLS"),
        ("intensity", "pet"),
        ("window", "liver_special"),
        ("window_width", -10.0),
        ("percentiles", (50.0, 10.0)),
        ("percentiles", (0.0, 101.0)),
        ("zscore_clip", 0.0),
    ],
)
def test_config_invalid_field_names_it(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        PreprocessConfig(**{field_name: value})


def test_config_window_pairs_and_unknown_keys():
    with pytest.raises(ValueError, match="window_width"):
        PreprocessConfig(window_center=40.0)
    with pytest.raises(ValueError, match="window"):
        PreprocessConfig(intensity="ct", window=None)
    assert PreprocessConfig(window_center=10.0, window_width=20.0).ct_window() == (10.0, 20.0)
    with pytest.raises(ValueError, match="bogus_key"):
        PreprocessConfig.from_dict({"input_size": 64, "bogus_key": 1})


# ------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------


def test_prepare_shapes_and_range():
    image = make_ct_volume(size=(40, 36, 10), spacing=(0.8, 0.8, 2.5), direction=random_oblique_direction(1))
    slices, geometry = prepare(image, PreprocessConfig(input_size=32))
    assert slices.shape == (10, 32, 32) and slices.dtype == torch.float32 and slices.is_contiguous()
    assert float(slices.min()) >= 0.0 and float(slices.max()) <= 1.0
    assert geometry.slice_axis == 2 and geometry.num_input_slices == 10
    slices, _ = prepare(image, PreprocessConfig(input_size=32, num_slices=16))
    assert slices.shape == (16, 32, 32)


def test_prepare_ct_window_endpoints():
    center, width = 40.0, 400.0
    array = np.full((4, 8, 8), center, dtype=np.float32)  # (K, J, I)
    array[1, 2, 3] = center - width / 2
    array[2, 5, 6] = center + width / 2
    array[3, 7, 0] = -1000.0
    array[0, 0, 7] = 3000.0
    image = _image(array, spacing=(1.0, 1.0, 2.0))
    config = PreprocessConfig(input_size=8, orientation="none", window="soft_tissue")
    slices, geometry = prepare(image, config)
    assert geometry.slice_axis == 2
    assert slices[1, 2, 3] == 0.0 and slices[2, 5, 6] == 1.0
    assert slices[3, 7, 0] == 0.0 and slices[0, 0, 7] == 1.0
    assert slices[0, 0, 0] == pytest.approx(0.5)
    explicit = PreprocessConfig(input_size=8, orientation="none", window_center=0.0, window_width=2000.0)
    assert prepare(image, explicit)[0][3, 7, 0] == pytest.approx(0.0)
    assert prepare(image, explicit)[0][0, 0, 0] == pytest.approx(0.52)


def test_prepare_slices_along_i_when_i_is_coarsest():
    rng = np.random.default_rng(0)
    array = rng.uniform(-100, 100, size=(10, 12, 6)).astype(np.float32)  # (K, J, I)
    image = _image(array, spacing=(3.0, 1.0, 1.0))
    config = PreprocessConfig(input_size=12, orientation="none", intensity="none")
    slices, geometry = prepare(image, config)
    assert geometry.slice_axis == 0 and geometry.num_input_slices == 6
    # in-plane is (K, J) = (10, 12): resized to 12 x 12, so compare a case without resize too
    assert slices.shape == (6, 12, 12)
    square = rng.uniform(-100, 100, size=(12, 12, 6)).astype(np.float32)
    slices, _ = prepare(_image(square, spacing=(3.0, 1.0, 1.0)), config)
    expected = (square - square.min()) / (square.max() - square.min())
    for i in range(6):
        np.testing.assert_allclose(slices[i].numpy(), expected[:, :, i], atol=1e-6)


def test_prepare_num_slices_is_linear_along_the_slice_axis():
    ramp = np.repeat(np.arange(8, dtype=np.float32)[:, None, None], 4, axis=1).repeat(4, axis=2)  # (K, J, I)
    config = PreprocessConfig(input_size=4, orientation="none", intensity="none", num_slices=5)
    slices, _ = prepare(_image(ramp, spacing=(1, 1, 2)), config)
    source = np.clip((np.arange(5) + 0.5) * 8 / 5 - 0.5, 0, 7)  # align_corners=False
    np.testing.assert_allclose(slices[:, 0, 0].numpy(), source / 7, atol=1e-6)


def test_intensity_modes():
    rng = np.random.default_rng(1)
    voxels = rng.normal(100, 20, size=(6, 8, 8)).astype(np.float32)
    for mode in ("mri_zscore", "mri_percentile", "none"):
        out = normalize_intensity(voxels, PreprocessConfig(intensity=mode))
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
        assert np.isfinite(normalize_intensity(np.full((3, 3, 3), 7.0), PreprocessConfig(intensity=mode))).all()
    z = normalize_intensity(voxels, PreprocessConfig(intensity="mri_zscore", zscore_clip=2.0))
    foreground = voxels[voxels > np.percentile(voxels, 1)]
    expected = (np.clip((voxels - foreground.mean()) / foreground.std(), -2, 2) + 2) / 4
    np.testing.assert_allclose(z, expected, atol=1e-5)
    p = normalize_intensity(voxels, PreprocessConfig(intensity="mri_percentile", percentiles=(10, 90)))
    lo, hi = np.percentile(voxels, (10, 90))
    np.testing.assert_allclose(p, np.clip((voxels - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert (normalize_intensity(np.full((3, 3, 3), 7.0), PreprocessConfig(intensity="none")) == 0).all()


# ------------------------------------------------------------------------------------------
# geometry round trip
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "none"])
@pytest.mark.parametrize("direction_name", ["oblique", "flipped"])
@pytest.mark.parametrize("slice_axis", ["auto", 0, 1])
def test_to_input_inverts_slicing_exactly(orientation, direction_name, slice_axis):
    size, spacing, origin = (30, 24, 12), (0.7, 0.9, 3.0), (12.5, -40.0, 7.25)
    image = _function_image(size, spacing, origin, DIRECTIONS[direction_name])
    config = PreprocessConfig(input_size=16, orientation=orientation, intensity="none", slice_axis=slice_axis)
    slices, geometry = prepare(image, config)
    axis = 2 if slice_axis == "auto" else slice_axis
    assert geometry.slice_axis == axis and geometry.num_input_slices == size[axis]
    assert slices.shape == (size[axis], 16, 16)

    oriented = _oriented(image, orientation)
    slice_space = _slice_space(oriented, _oriented_axis(image, oriented, axis))
    assert slice_space.shape[0] == size[axis]
    back = geometry.to_input(slice_space)
    _assert_same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image), atol=1e-5)
    back_torch = geometry.to_input(torch.from_numpy(slice_space.copy()))  # also: a non-contiguous array above
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back_torch), sitk.GetArrayFromImage(back))


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "none"])
@pytest.mark.parametrize("direction_name", ["oblique", "flipped"])
def test_prepare_slices_are_what_to_input_maps_back(orientation, direction_name):
    """With no resize, prepare's own slices go back to the input voxels (min-max scaled)."""
    image = _function_image((20, 20, 9), (0.8, 0.8, 2.0), (3.0, 4.0, -5.0), DIRECTIONS[direction_name])
    slices, geometry = prepare(image, PreprocessConfig(input_size=20, orientation=orientation, intensity="none"))
    values = sitk.GetArrayFromImage(image)
    scaled = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(sitk.GetArrayFromImage(geometry.to_input(slices)), scaled, atol=1e-5)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "none"])
@pytest.mark.parametrize("direction_name", ["oblique", "flipped"])
def test_low_resolution_map_peak_lands_at_its_physical_location(orientation, direction_name):
    size = (28, 20, 12)  # in-plane sizes / 4 are odd, so low-res cell centres fall on voxels
    image = _function_image(size, (0.7, 0.9, 3.0), (1.0, 2.0, 3.0), DIRECTIONS[direction_name])
    _, geometry = prepare(image, PreprocessConfig(input_size=16, orientation=orientation))
    oriented = _oriented(image, orientation)
    oriented_axis = _oriented_axis(image, oriented, geometry.slice_axis)
    full = _slice_space(oriented, oriented_axis).shape  # (S, H, W)
    low = np.zeros((full[0], 4, 4), dtype=np.float32)
    cell = (5, 1, 2)
    low[cell] = 1.0
    mapped = geometry.to_input(low)
    _assert_same_geometry(mapped, image)
    # expected: the low-res cell centre in full-res slice space -> oriented index -> physical point
    s = cell[0]
    r = (cell[1] + 0.5) * full[1] / 4 - 0.5
    c = (cell[2] + 0.5) * full[2] / 4 - 0.5
    numpy_index = [r, c]
    numpy_index.insert(2 - oriented_axis, s)
    expected = oriented.TransformContinuousIndexToPhysicalPoint([float(v) for v in reversed(numpy_index)])
    values = sitk.GetArrayFromImage(mapped)
    peak_kji = np.unravel_index(int(np.argmax(values)), values.shape)
    assert values[peak_kji] == pytest.approx(1.0)
    found = mapped.TransformIndexToPhysicalPoint([int(v) for v in reversed(peak_kji)])
    np.testing.assert_allclose(found, expected, atol=1e-6)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "none"])
@pytest.mark.parametrize("direction_name", ["oblique", "flipped"])
def test_importance_one_hot_maps_to_the_same_physical_slice(orientation, direction_name):
    image = _function_image((10, 8, 6), (0.7, 0.9, 3.0), (1.0, -2.0, 3.0), DIRECTIONS[direction_name])
    _, geometry = prepare(image, PreprocessConfig(input_size=8, orientation=orientation))
    oriented = _oriented(image, orientation)
    oriented_axis = _oriented_axis(image, oriented, geometry.slice_axis)
    if direction_name == "flipped" and orientation == "LPS":
        assert geometry.axis_flipped[geometry.oriented_slice_axis]  # this case exercises the flip
    for s in range(6):
        one_hot = np.zeros(6)
        one_hot[s] = 3.0
        weights = geometry.importance_to_input(one_hot)
        assert weights.shape == (6,) and weights.sum() == pytest.approx(1.0)
        index = [0, 0, 0]
        index[oriented_axis] = s
        point = oriented.TransformIndexToPhysicalPoint(index)
        input_index = image.TransformPhysicalPointToContinuousIndex(point)
        assert int(np.argmax(weights)) == round(input_index[geometry.slice_axis])
        assert weights.max() == pytest.approx(1.0)
    resampled = geometry.importance_to_input(torch.rand(15))
    assert resampled.shape == (6,) and resampled.sum() == pytest.approx(1.0)
    assert geometry.importance_to_input(np.zeros(6)) == pytest.approx(np.full(6, 1 / 6))


# ------------------------------------------------------------------------------------------
# model input
# ------------------------------------------------------------------------------------------


def test_to_model_input_matches_hand_computation():
    x = torch.rand(3, 5, 5)
    out = to_model_input(x)
    assert out.shape == (3, 3, 5, 5) and out.dtype == x.dtype
    for c, (mean, std) in enumerate(zip(pp.IMAGENET_MEAN, pp.IMAGENET_STD)):
        np.testing.assert_allclose(out[:, c].numpy(), (x.numpy() - mean) / std, rtol=1e-6, atol=1e-6)
    y = to_model_input(x[:, None].double())
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), out.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------
# reading: good and bad inputs
# ------------------------------------------------------------------------------------------


def _write_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


def test_read_image_nifti_and_nrrd(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)  # nibabel: (I, J, K)
    image = read_image(_write_nifti(tmp_path / "ok.nii.gz", data))
    assert image.GetSize() == (6, 5, 4) and image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), data.transpose(2, 1, 0), atol=1e-6)
    integers = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    image = read_image(_write_nifti(tmp_path / "int.nii", integers))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), integers.transpose(2, 1, 0))
    short = sitk.Cast(make_ct_volume(size=(8, 7, 5)), sitk.sitkInt16)
    sitk.WriteImage(short, str(tmp_path / "ok.nrrd"))
    back = read_image(tmp_path / "ok.nrrd")
    assert back.GetPixelID() == sitk.sitkFloat32 and back.GetSize() == (8, 7, 5)


def test_read_image_missing(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: .*not found"):
        read_image(tmp_path / "nothere.nii.gz")


def test_read_image_random_bytes(tmp_path):
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InputError, match=r"noise\.nii\.gz: is not a readable image file"):
        read_image(path)


def test_read_image_truncated_nifti_gz(tmp_path):
    path = _write_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: NIfTI data is truncated"):
        read_image(path)


def test_read_image_truncated_plain_nifti(tmp_path):
    path = _write_nifti(tmp_path / "cut.nii", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        InputError, match=r"cut\.nii: NIfTI data is truncated: the file has 31352 bytes, the header needs 32352"
    ):
        read_image(path)


def test_read_image_nifti_nan(tmp_path):
    data = np.zeros((6, 5, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    data[5, 4, 3] = np.nan
    path = _write_nifti(tmp_path / "nan.nii.gz", data)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # SimpleITK hides them
    with pytest.raises(InputError, match=r"nan\.nii\.gz: has 3 NaN or infinite voxels"):
        read_image(path)
    path = _write_nifti(tmp_path / "nan.nii", data)
    with pytest.raises(InputError, match=r"nan\.nii: has 3 NaN or infinite voxels"):
        read_image(path)


def test_read_image_inf_in_nrrd(tmp_path):
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[2, 2, 2] = np.inf
    array[3, 1, 0] = -np.inf
    sitk.WriteImage(_image(array), str(tmp_path / "inf.nrrd"))
    with pytest.raises(InputError, match=r"inf\.nrrd: has 2 NaN or infinite voxels"):
        read_image(tmp_path / "inf.nrrd")


def test_read_image_2d(tmp_path):
    sitk.WriteImage(sitk.Image([8, 9], sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match=r"flat\.nrrd: is a 2D image"):
        read_image(tmp_path / "flat.nrrd")


def test_read_image_4d(tmp_path):
    _write_nifti(tmp_path / "series.nii.gz", np.zeros((5, 6, 7, 4), dtype=np.float32))
    with pytest.raises(InputError, match=r"series\.nii\.gz: is a 4D image of size \(5, 6, 7, 4\)"):
        read_image(tmp_path / "series.nii.gz")
    single = sitk.Image([5, 6, 7, 1], sitk.sitkFloat32)
    single.SetSpacing((0.5, 0.6, 0.7, 1.0))
    sitk.WriteImage(single, str(tmp_path / "single.mha"))
    image = read_image(tmp_path / "single.mha")
    assert image.GetSize() == (5, 6, 7)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.6, 0.7))


def test_read_image_zero_spacing(tmp_path):
    sitk.WriteImage(_image(np.zeros((4, 5, 6))), str(tmp_path / "zero.mha"))
    data = (tmp_path / "zero.mha").read_bytes()
    assert b"ElementSpacing = 1 1 1" in data
    (tmp_path / "zero.mha").write_bytes(data.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 0 1 2.5"))
    with pytest.raises(InputError, match=r"zero\.mha: has zero or negative spacing \(0\.0, 1\.0, 2\.5\)"):
        read_image(tmp_path / "zero.mha")


def test_read_image_single_slice(tmp_path):
    sitk.WriteImage(sitk.Image([8, 9, 1], sitk.sitkFloat32), str(tmp_path / "one.mha"))
    with pytest.raises(InputError, match=r"one\.mha: has a single slice along axis 2"):
        read_image(tmp_path / "one.mha")


def test_read_image_huge_header_refused_quickly(tmp_path):
    path = tmp_path / "huge.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "ElementSpacing = 1 1 1\nDimSize = 2048 2048 2048\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"huge\.mha: is too large: \(2048, 2048, 2048\)"):
        read_image(path)
    assert time.perf_counter() - start < 2.0


def test_validate_image_in_memory():
    array = np.zeros((3, 4, 5), dtype=np.float32)
    array[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="case7: has 1 NaN or infinite voxels"):
        image_reading.validate_image(_image(array), "case7")
    with pytest.raises(InputError, match="single slice along axis 0"):
        image_reading.validate_image(_image(np.zeros((3, 4, 1))))
    with pytest.raises(InputError, match="2D"):
        image_reading.validate_image(sitk.Image([4, 4], sitk.sitkFloat32))
    singular = _image(np.zeros((3, 4, 5)))
    singular.SetDirection((1, 0, 0, 1, 1e-9, 0, 0, 0, 1))  # ITK refuses det == 0 exactly, not det ~ 0
    with pytest.raises(InputError, match="direction"):
        image_reading.validate_image(singular)
    image_reading.validate_image(make_ct_volume(size=(8, 8, 4)))


def _write_dicom_series(image, folder, series_number=1, prefix=""):
    """SimpleITK's 'Dicom Series From Array' pattern: one file per slice with per-slice tags."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    date, clock = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    d = image.GetDirection()
    series = [
        ("0008|0031", clock),
        ("0008|0021", date),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000e", f"1.2.826.0.1.3680043.2.1125.{date}.{series_number}{clock}"),
        ("0020|0011", str(series_number)),
        ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
        ("0008|103e", f"anymc3d test {series_number}"),
        ("0008|0060", "CT"),
    ]
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in series:
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0008|0012", date)
        piece.SetMetaData("0008|0013", clock)
        piece.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        piece.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"{prefix}{k}.dcm"))
        writer.Execute(piece)


def test_read_dicom_folder_with_two_series_takes_the_larger(tmp_path, caplog):
    large = sitk.Cast(make_ct_volume(size=(8, 8, 5), spacing=(1.0, 1.0, 2.0)), sitk.sitkInt16)
    small = sitk.Cast(make_ct_volume(size=(6, 6, 3), spacing=(1.0, 1.0, 3.0)), sitk.sitkInt16)
    _write_dicom_series(small, tmp_path / "mixed", series_number=1, prefix="a")
    _write_dicom_series(large, tmp_path / "mixed", series_number=2, prefix="b")
    with caplog.at_level("WARNING", logger="anymc3d.preprocessing"):
        image = read_image(tmp_path / "mixed")
    assert image.GetSize() == (8, 8, 5)
    assert "2 DICOM series found" in caplog.text


def test_read_dicom_series_and_find_images(tmp_path):
    volume = sitk.Cast(make_ct_volume(size=(16, 12, 6), spacing=(0.7, 0.8, 2.5)), sitk.sitkInt16)
    _write_dicom_series(volume, tmp_path / "ct_series")
    image = read_image(tmp_path / "ct_series")
    assert image.GetSize() == (16, 12, 6) and image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume), atol=1e-3)

    _write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), dtype=np.float32))
    sitk.WriteImage(_image(np.zeros((3, 3, 3))), str(tmp_path / "b.nrrd"))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".a.partial-1.nii.gz").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert image_reading.find_images(tmp_path) == [tmp_path / "a.nii.gz", tmp_path / "b.nrrd", tmp_path / "ct_series"]
    with pytest.raises(InputError, match="empty: folder holds no DICOM series"):
        read_image(tmp_path / "empty")


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["heat.nii.gz", "heat.nrrd", "heat.mha"])
def test_write_image_atomic_preserves_geometry(tmp_path, name):
    image = make_ct_volume(
        size=(9, 8, 5), spacing=(0.7, 0.9, 3.0), origin=(1, 2, 3), direction=random_oblique_direction(2)
    )
    written = write_image_atomic(image, tmp_path / name)
    assert written == tmp_path / name
    assert sorted(os.listdir(tmp_path)) == [name]
    back = sitk.ReadImage(str(written))
    _assert_same_geometry(back, image, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image), atol=1e-3)


def test_write_image_atomic_missing_folder(tmp_path):
    target = tmp_path / "no" / "such" / "heat.nii.gz"
    with pytest.raises(InputError, match=r"heat\.nii\.gz: could not be written"):
        write_image_atomic(make_ct_volume(size=(4, 4, 3)), target)
    assert os.listdir(tmp_path) == []


def test_write_image_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    seen = []

    def failing_write(image, file_name, useCompression=False, *args, **kwargs):
        seen.append(file_name)
        with open(file_name, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("ITK ERROR: ImageFileWriter(0x1234): disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(InputError, match=r"heat\.nii\.gz: could not be written \(disk full\)"):
        write_image_atomic(make_ct_volume(size=(4, 4, 3)), tmp_path / "heat.nii.gz")
    name = os.path.basename(seen[0])
    assert seen and name.startswith(".heat.nii.gz.") and name.endswith(".partial.nii.gz")  # hidden, real suffix
    assert os.listdir(tmp_path) == []


def test_write_image_atomic_rename_failure_leaves_nothing(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match="rename refused"):
        write_image_atomic(make_ct_volume(size=(4, 4, 3)), tmp_path / "heat.nrrd")
    assert os.listdir(tmp_path) == []


def test_write_image_atomic_refuses_detached_header(tmp_path):
    with pytest.raises(InputError, match=r"heat\.mhd"):
        write_image_atomic(make_ct_volume(size=(4, 4, 3)), tmp_path / "heat.mhd")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_has_its_geometry():
    direction = random_oblique_direction(5)
    assert direction == random_oblique_direction(5)
    rotation = np.asarray(direction).reshape(3, 3)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert np.abs(rotation).max() < 0.95
    a = make_ct_volume(seed=4, direction=direction, origin=(1, 2, 3))
    b = make_ct_volume(seed=4, direction=direction, origin=(1, 2, 3))
    c = make_ct_volume(seed=5, direction=direction, origin=(1, 2, 3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(c))
    assert a.GetSize() == (64, 64, 40) and a.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(a.GetDirection(), direction)
    values = sitk.GetArrayFromImage(a)
    assert np.median(values) < -500 and (values > 500).any() and ((values > -900) & (values < -700)).any()


def test_synthetic_lesion_is_bright_where_asked():
    center, radius = (32.0, 24.0, 20.0), 6.0
    plain = sitk.GetArrayFromImage(make_ct_volume(seed=1))
    with_lesion = sitk.GetArrayFromImage(
        make_ct_volume(seed=1, lesion=True, lesion_center=center, lesion_radius_mm=radius)
    )
    k, j, i = np.meshgrid(np.arange(40), np.arange(64), np.arange(64), indexing="ij")
    distance = np.sqrt(((i - center[0]) * 0.8) ** 2 + ((j - center[1]) * 0.8) ** 2 + ((k - center[2]) * 2.5) ** 2)
    region = distance < 0.7 * radius
    assert region.sum() > 20
    assert with_lesion[region].max() > plain[region].max() + 50
    assert with_lesion[region].mean() == pytest.approx(160.0, abs=10.0)
    np.testing.assert_array_equal(with_lesion[distance > 1.5 * radius], plain[distance > 1.5 * radius])


def test_image_stem_strips_only_image_suffixes():
    assert [image_stem(n) for n in ("case1.nii.gz", "CT.NRRD", "a.b.mha", "series.v2", "dicom_folder")] == [
        "case1", "CT", "a.b", "series.v2", "dicom_folder"]


def test_each_dicom_series_of_a_folder_can_be_read_by_its_uid(tmp_path):
    large = sitk.Cast(make_ct_volume(size=(8, 8, 5), spacing=(1.0, 1.0, 2.0), seed=1), sitk.sitkInt16)
    small = sitk.Cast(make_ct_volume(size=(6, 6, 3), spacing=(1.0, 1.0, 3.0), seed=2), sitk.sitkInt16)
    _write_dicom_series(small, tmp_path / "mixed", series_number=1, prefix="a")
    _write_dicom_series(large, tmp_path / "mixed", series_number=2, prefix="b")
    first, second = image_reading.dicom_series_ids(tmp_path / "mixed")
    for uid, volume in ((first, large), (second, small)):
        image = read_image(tmp_path / "mixed", series=uid)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume), atol=1e-3)
    with pytest.raises(InputError, match="mixed: folder holds no DICOM series 1.2.3"):
        read_image(tmp_path / "mixed", series="1.2.3")


def test_scan_folder_reports_broken_links_that_find_images_skips(tmp_path):
    _write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), dtype=np.float32))
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "ok_link.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    images, problems = image_reading.scan_folder(tmp_path)
    assert images == image_reading.find_images(tmp_path) == [tmp_path / "a.nii.gz", tmp_path / "ok_link.nii.gz"]
    assert [(p.name, why.split(" (")[0]) for p, why in problems] == [
        ("gone.nii.gz", "is a dangling symbolic link"), ("loop", "is a symbolic link loop")]
    with pytest.raises(InputError, match="loop: is a symbolic link loop"):
        read_image(tmp_path / "loop")
