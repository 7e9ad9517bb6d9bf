"""The module's self-test: end to end on the CPU with the real backend, in the Slicer application (ctest runs it)."""

import hashlib
import os
import shutil
import subprocess
import tempfile
import unittest

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class EndToEndTest(ScriptedLoadableModuleTest):
    """End to end on the CPU: the untrained demo backbone and plugin, the shipped sample volume, the real backend.

    The results are checked against the backend run directly on the sample file (same probabilities within
    1e-4) and against the contract (probabilities in [0, 1], decisions from the thresholds, slice importance sums
    to 1, heatmaps max-normalised on the input grid); geometry with a tolerance of 1e-6 of the matrix scale.

    Safe on the extension build machines, which run it through ctest, offline: it installs nothing (missing Python
    packages skip it), its backbone is the demo's (written locally, no download), the demo is not trained, and
    tearDown closes the Logic (no backend process left waiting).

    The module file's test class gives it the module's logic class, Logic package and sample data (class attributes).
    """

    logicClass = logicPackage = registerSampleData = samplePath = sampleName = sampleSha256 = None

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tempDir = tempfile.mkdtemp(prefix="AnyMC3DTest-")
        self.logic = None

    def tearDown(self):
        if self.logic is not None:
            self.logic.close()  # the backend process kept ready
            self.logic = None
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def runTest(self):
        self.setUp()
        try:
            self.test_EndToEnd()
        finally:
            self.tearDown()

    def assertMatricesClose(self, actual, expected, relative=1e-6):
        import numpy as np

        actual, expected = slicer.util.arrayFromVTKMatrix(actual), slicer.util.arrayFromVTKMatrix(expected)
        scale = max(1.0, float(np.abs(expected).max()))
        self.assertTrue(np.allclose(actual, expected, rtol=0, atol=relative * scale), f"{actual} != {expected}")

    def skipUnlessDependenciesPresent(self):
        """Skip (never install: the build machines run this offline) when the backend's packages are missing."""
        missing = self.logicPackage.DependencyChecker().missingPackages()
        if missing:
            reason = f"AnyMC3D self-test skipped: Python packages not installed: {', '.join(missing)} (Apply installs them)"
            self.delayDisplay(reason)
            raise unittest.SkipTest(reason)

    def test_EndToEnd(self):
        import json

        import numpy as np

        self.delayDisplay("Checking dependencies")
        self.skipUnlessDependenciesPresent()
        logic = self.logic = self.logicClass()

        self.delayDisplay("Creating the demo backbone and plugin (untrained: no download, no training)")
        subprocess.run([*logic.backendCommand, "demo", self.tempDir, "--no-train"], env=logic.backendEnvironment(),
                       check=True, capture_output=True)
        backbone, plugin = os.path.join(self.tempDir, "backbone.safetensors"), os.path.join(self.tempDir, "plugin.anymc3d")

        self.delayDisplay("Running the backend directly on the sample file (the reference)")
        import SampleData

        self.registerSampleData()
        samplePath = self.samplePath()
        with open(samplePath, "rb") as file:
            self.assertEqual(hashlib.sha256(file.read()).hexdigest(), self.sampleSha256)
        referenceJson = os.path.join(self.tempDir, "reference.json")
        subprocess.run([*logic.backendCommand, "predict", samplePath, "--backbone", backbone, "--plugin", plugin,
                        "--device", "cpu", "--json", referenceJson], env=logic.backendEnvironment(), check=True,
                       capture_output=True)
        with open(referenceJson, encoding="utf-8") as file:
            (reference,) = json.load(file)
        (referenceResult,) = reference["results"]

        self.delayDisplay("Running the backend through the Logic on the loaded sample volume")
        inputVolume = SampleData.downloadSample(self.sampleName)
        self.assertIsNotNone(inputVolume)
        stages = []
        result = logic.runPrediction([inputVolume], backbone, [plugin], self.logicPackage.PredictionOptions(device="cpu"),
                                     onProgress=lambda p: stages.append(p.stage), timeout=600)
        self.assertEqual(result.status, "ok", result.message)
        self.assertIn("encoding", stages)
        (backendResult,) = result.outputs.record["results"]
        table = result.outputs.tableNode
        self.assertEqual(table.GetNumberOfRows(), len(referenceResult["labels"]))
        for row, label in enumerate(referenceResult["labels"]):
            probability = float(table.GetCellText(row, 2))
            self.assertEqual(table.GetCellText(row, 1), label)
            self.assertTrue(0.0 <= probability <= 1.0)
            self.assertAlmostEqual(probability, referenceResult["probabilities"][label], delta=1e-4)
            threshold = backendResult["thresholds"][label]
            self.assertEqual(table.GetCellText(row, 4), "positive" if probability >= threshold else "negative")
        self.assertAlmostEqual(sum(backendResult["slice_importance"]), 1.0, delta=1e-3)
        self.assertEqual(len(backendResult["slice_importance"]), result.outputs.record["num_slices"])
        np.testing.assert_allclose(backendResult["slice_importance"], referenceResult["slice_importance"], atol=1e-4)
        (heatmap,) = result.outputs.heatmapNodes
        voxels = slicer.util.arrayFromVolume(heatmap)
        self.assertAlmostEqual(float(voxels.max()), 1.0, delta=1e-5)
        self.assertGreaterEqual(float(voxels.min()), -1e-6)

        self.delayDisplay("Running again on an oblique, anisotropic copy: the heatmap must follow the geometry")
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        rotation = vtk.vtkTransform()
        rotation.RotateZ(20)
        rotation.RotateX(10)
        rotation.Scale(0.8, 0.9, 2.5)
        oblique = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), ijkToRas, oblique)
        inputVolume.SetIJKToRASMatrix(oblique)
        result = logic.runPrediction([inputVolume], backbone, [plugin], self.logicPackage.PredictionOptions(device="cpu"), timeout=600)
        self.assertEqual(result.status, "ok", result.message)
        (heatmap,) = result.outputs.heatmapNodes
        heatmapMatrix, inputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        heatmap.GetIJKToRASMatrix(heatmapMatrix)
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        self.assertMatricesClose(heatmapMatrix, inputMatrix)  # the node re-decomposes the matrix (~1e-17 off)
        self.assertMatricesClose(heatmapMatrix, oblique)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        self.assertEqual(heatmap.GetDisplayNode().GetColorNode().GetName(), self.logicPackage.COLOR_TABLE_NAME)
        volumeRendering = slicer.modules.volumerendering.logic().GetFirstVolumeRenderingDisplayNode(heatmap)
        self.assertIsNotNone(volumeRendering)
        self.assertTrue(volumeRendering.GetVisibility())
        for compositeNode in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):  # none with --no-main-window
            self.assertEqual(compositeNode.GetForegroundVolumeID(), heatmap.GetID())
        self.assertEqual(result.outputs.chartNode.GetNumberOfPlotSeriesNodes(), 1)
        self.delayDisplay("Test passed")
