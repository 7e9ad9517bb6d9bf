"""``intensity="auto"``: the CT window for a CT in Hounsfield units (its modality tag, or air near -1000 in view),
else the z-score; a forced mapping that blanks the image is warned about. Checked on a synthetic CT in HU and on a
real MRI (nilearn's MNI152, from the installed package) against hand computations of the two mappings."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.intensity import (BLANK_STD, auto_intensity, image_modality, modality_from_intensities,
                               normalize_intensity, resolve_intensity)
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare
from anymc3d.synthetic import make_ct_volume


def test_the_rule_on_the_lowest_value_and_the_tag():
    assert modality_from_intensities(-1024.0) == "CT" and modality_from_intensities(-500.0) == "CT"
    assert modality_from_intensities(0.0) == "MR" and modality_from_intensities(-199.0) == "MR"
    assert modality_from_intensities(-300.0) is None  # between fat and air: cannot tell
    assert auto_intensity(-1024.0) == "ct" and auto_intensity(0.0) == "mri_zscore" and auto_intensity(-300.0) == "mri_zscore"
    assert auto_intensity(0.0, "CT") == "ct" and auto_intensity(-1024.0, "MR") == "mri_zscore"  # the tag wins
    assert image_modality({"0008|0060": "CT "}) == "CT" and image_modality({"Modality": "MET_MOD_MR"}) == "MR"
    assert image_modality({"0008|0060": "PT"}) is None and image_modality({}) is None
    resolved = resolve_intensity(PreprocessConfig(intensity="auto", window=None), -1000.0)
    assert resolved.intensity == "ct" and resolved.window == "soft_tissue"
    assert resolve_intensity(PreprocessConfig(intensity="mri_percentile", window=None), -1000.0).intensity == "mri_percentile"


def test_auto_is_the_ct_window_on_a_ct_in_hu():
    volume = make_ct_volume(size=(24, 24, 6), spacing=(1.0, 1.0, 3.0), lesion=True, seed=0)  # float32 HU, air -1000
    x = sitk.GetArrayFromImage(volume)
    by_hand = np.clip((x - (40 - 200)) / 400, 0, 1)  # soft-tissue window 40 +- 200 HU
    np.testing.assert_allclose(normalize_intensity(x, PreprocessConfig()), by_hand, atol=1e-6)


@pytest.fixture(scope="module")
def mni():
    nilearn = pytest.importorskip("nilearn.datasets")
    image = nilearn.load_mni152_template(resolution=2)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    return sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))


def test_auto_is_the_zscore_on_a_real_mri_and_a_forced_ct_window_is_warned(mni, caplog):
    x = sitk.GetArrayFromImage(mni)
    assert x.min() >= 0  # an MR magnitude image: no HU air
    config = PreprocessConfig(input_size=32)
    fg = x[x > np.percentile(x, 1)]
    lo, hi = fg.mean() - 3 * fg.std(), fg.mean() + 3 * fg.std()
    np.testing.assert_allclose(normalize_intensity(x, config), np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="anymc3d.intensity"):
        slices, _ = prepare(mni, config, source="mni.nii.gz")
    assert float(slices.std()) > 0.1 and not caplog.records
    # the image as many pipelines hand it on, rescaled to [0, 1]: the CT window makes it nearly uniform
    scaled = sitk.RescaleIntensity(mni, 0.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="anymc3d.intensity"):
        slices, _ = prepare(scaled, PreprocessConfig(input_size=32, intensity="ct"), source="mni.nii.gz")
    assert float(slices.std()) < BLANK_STD
    assert len(caplog.records) == 1 and "mni.nii.gz: after the 'ct' intensity mapping the volume is nearly blank" \
        in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anymc3d.intensity"):
        slices, _ = prepare(scaled, PreprocessConfig(input_size=32), source="mni.nii.gz")  # auto: z-score
    assert float(slices.std()) > 0.1 and not caplog.records


def test_a_ct_modality_tag_overrides_the_values(mni):
    tagged = sitk.Image(mni)
    tagged.SetMetaData("0008|0060", "CT")
    slices, _ = prepare(tagged, PreprocessConfig(input_size=32))  # stated CT: the CT window, whatever the values
    x = sitk.GetArrayFromImage(mni)
    assert float(slices.mean()) == pytest.approx(float(np.clip((x + 160) / 400, 0, 1).mean()), abs=0.02)
