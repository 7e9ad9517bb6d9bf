"""The module's "Similarity from point" section in the Slicer-like Python (slicer-core + Testing/slicer_standins),
with the real backend through the module's QProcess runner (its stand-in starts a real process)."""

import pytest
import SimpleITK as sitk

from .slicer_testing import writeObliqueVolume
from .test_module_in_slicer_standin import runScenario


@pytest.mark.slow  # a child-process Slicer scenario with the real backend
def test_placing_and_moving_a_point_shows_its_similarity_map(demo, tmp_path):
    path = writeObliqueVolume(tmp_path / "Oblique.nii.gz", size=(8, 8, 6))
    image = sitk.ReadImage(path)

    def ras(ijk):
        x, y, z = image.TransformIndexToPhysicalPoint(ijk)
        return [-x, -y, z]

    seen = runScenario("similarityFromPoint", {"backbone": demo["backbone"], "volume": path,
                                               "ras": [ras((2, 5, 3)), ras((6, 1, 0))]})
    first, second = seen["first"], seen["second"]
    assert seen["firstStarted"] and seen["secondStarted"]  # in the background: setup returned before the result
    assert first["status"] == "ok", first["message"]
    assert first["ijk"] == [2, 5, 3] and first["cacheHit"] is False and first["shown"] == "Oblique similarity"
    assert first["label"] == "Similarity map of voxel (2, 5, 3)"
    assert second["status"] == "ok" and second["ijk"] == [6, 1, 0] and second["cacheHit"] is True
    assert second["label"] == "Similarity map of voxel (6, 1, 0) (cached features)"
    assert first["inputChoices"] == second["inputChoices"] == ["Oblique"]  # maps are results, never inputs
    assert seen["tempDirRemoved"]
