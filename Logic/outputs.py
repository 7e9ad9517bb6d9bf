"""Import backend results into the MRML scene: findings table, heatmap volumes, display, slice-importance chart.

Only MRML / logic classes, vtk and numpy are used, so this runs on slicer-core's scene as in the application.
Output nodes are linked by node references (saved with the scene) so a reloaded scene still works:

- findings table --``AnyMC3DInput``--> input volume, --``AnyMC3DHeatmap``--> one heatmap per table row (in row
  order), --``AnyMC3DImportance``--> slice-importance table, --``AnyMC3DChart``--> chart.
"""

import collections
import itertools

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

INPUT_REFERENCE = "AnyMC3DInput"
HEATMAP_REFERENCE = "AnyMC3DHeatmap"
IMPORTANCE_REFERENCE = "AnyMC3DImportance"
CHART_REFERENCE = "AnyMC3DChart"
SLICING_AXIS_ATTRIBUTE = "AnyMC3D.SlicingAxis"
ROLE_ATTRIBUTE = "AnyMC3D.Role"
COLOR_TABLE_NAME = "AnyMC3D Heatmap"

# A perceptual colour map: matplotlib's "inferno" (van der Walt & Smith, BIDS colormaps, CC0) sampled at 17 stops;
# its lightness rises monotonically from black to pale yellow, so a brighter colour always means a larger value
# (a rainbow's does not: its yellow looks larger than its red). A table, not a matplotlib call: Slicer's Python
# need not have matplotlib. Linear interpolation between the stops stays within 0.03 of inferno (tested).
HEATMAP_COLOR_STOPS = ((0.0, (0.0015, 0.0005, 0.0139)), (0.0625, (0.0423, 0.0281, 0.1411)),
                       (0.125, (0.1293, 0.0473, 0.2908)), (0.1875, (0.2383, 0.0366, 0.3964)),
                       (0.25, (0.3415, 0.0623, 0.4294)), (0.3125, (0.4412, 0.0993, 0.4316)),
                       (0.375, (0.5409, 0.1347, 0.4151)), (0.4375, (0.6401, 0.1714, 0.3811)),
                       (0.5, (0.7357, 0.2159, 0.3302)), (0.5625, (0.8224, 0.2752, 0.2661)),
                       (0.625, (0.8943, 0.3534, 0.1936)), (0.6875, (0.9470, 0.4492, 0.1153)),
                       (0.75, (0.9784, 0.5579, 0.0349)), (0.8125, (0.9879, 0.6753, 0.0653)),
                       (0.875, (0.9746, 0.7977, 0.2063)), (0.9375, (0.9476, 0.9174, 0.4107)),
                       (1.0, (0.9884, 0.9984, 0.6449)))
TABLE_COLUMNS = ("Plugin", "Finding", "Probability", "Threshold", "Decision")
#: on a heatmap node imported before its file was read (pendingHeatmapVolume): the file it waits for
PENDING_FILE_ATTRIBUTE = "AnyMC3D.PendingFile"
#: on a findings table: the row selectFinding showed last
SHOWN_ROW_ATTRIBUTE = "AnyMC3D.ShownRow"
#: on an image node loaded from a file read off the event loop: its automatic window "low high" (autoWindowRange)
AUTO_WINDOW_ATTRIBUTE = "AnyMC3D.AutoWindow"
#: on an image node loaded from a file read off the event loop: its lowest and highest value "low high"
VALUE_RANGE_ATTRIBUTE = "AnyMC3D.ValueRange"


def heatmapColor(value):
    """RGB of the heatmap colour map at ``value`` in [0, 1]."""
    value = min(max(float(value), 0.0), 1.0)
    for (x0, c0), (x1, c1) in itertools.pairwise(HEATMAP_COLOR_STOPS):
        if value <= x1:
            t = (value - x0) / (x1 - x0)
            return tuple(a + t * (b - a) for a, b in zip(c0, c1))
    return HEATMAP_COLOR_STOPS[-1][1]


def ijkToRasMatrix(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def matrixToArray(matrix):
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def arrayFromVolumeNode(volumeNode):
    """Voxels as a (K, J, I) numpy view, like ``slicer.util.arrayFromVolume``."""
    imageData = volumeNode.GetImageData()
    dims = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[::-1])


def voxelToRas(volumeNode, ijk):
    """RAS (world) position of voxel ``ijk``, through the node's parent transforms if any."""
    ras = ijkToRasMatrix(volumeNode).MultiplyPoint([float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0])[:3]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        toWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(toWorld)
        ras = toWorld.TransformPoint(ras)
    return tuple(float(x) for x in ras)


def copyGeometryExactly(targetNode, referenceNode):
    """Give ``targetNode`` the reference's origin, spacing and directions, bit for bit.

    The volume node's setters ignore changes within a fuzzy tolerance, so a matrix read from a file (float
    rounding) would survive a plain ``CopyOrientation``: move every component away first, then copy.
    """
    targetNode.SetIJKToRASDirections([[0.0] * 3 for _ in range(3)])
    targetNode.SetSpacing(-1.0, -1.0, -1.0)
    targetNode.SetOrigin(1e30, 1e30, 1e30)
    targetNode.CopyOrientation(referenceNode)


# ---------------------------------------------------------------------------------------------------------------
# Colour table


def heatmapColorTableNode(scene):
    """The heatmap colour table (HEATMAP_COLOR_STOPS, inferno), created once per scene (and saved with it)."""
    for node in nodesByClass(scene, "vtkMRMLColorTableNode"):
        if node.GetName() == COLOR_TABLE_NAME:
            return node
    colorNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
    colorNode.SetTypeToUser()
    colorNode.SetNumberOfColors(256)
    for index in range(256):
        r, g, b = heatmapColor(index / 255.0)
        colorNode.SetColor(index, f"{index / 255.0:.3f}", r, g, b, 1.0)
    colorNode.SetAttribute("Category", "AnyMC3D")
    colorNode.AddDefaultStorageNode()
    return colorNode


# ---------------------------------------------------------------------------------------------------------------
# Nodes


class VolumeData(collections.namedtuple("VolumeData", "voxels ijkToRas windowRange blocks valueRange",
                                         defaults=(None, None, None))):
    """A volume file read off the event loop (:func:`readVolumeFile`): ``voxels`` (K, J, I) and ``ijkToRas``, plus
    what would otherwise cost a second each on the event loop: ``windowRange`` (Slicer's automatic window of an
    image, :func:`autoWindowRange`), ``valueRange`` (its lowest and highest value, what VTK's GetScalarRange
    computes) and ``blocks`` (a heatmap's 3D-view block means, :func:`blockMeans`)."""


def readVolumeFile(path, autoWindow=False, blockMaxSize=0):
    """The :class:`VolumeData` of a 3D scalar image file (``voxels`` (K, J, I), 4x4 IJK-to-RAS matrix).

    Read with SimpleITK (the ITK readers Slicer's volume storage node uses; LPS turned into RAS here), which
    releases the GIL while it reads and decompresses: a caller can read the next case in a thread while its
    event loop goes on (VTK's reader holds the GIL for the whole read). ``autoWindow``: also compute the image's
    automatic window range; ``blockMaxSize`` > 0: also the heatmap's block means for a 3D view of that size
    (numpy releases the GIL too). Raises ValueError naming the file.
    """

    try:
        image = _headerChecked(path).Execute()
    except RuntimeError as error:
        raise ValueError(f"Cannot read {path}: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} is not a 3D scalar image")
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = lpsToRas @ np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijkToRas[:3, 3] = lpsToRas @ np.asarray(image.GetOrigin())
    voxels = np.asarray(_ImageBuffer(image))  # no copy (0.4 s for 512x512x300 floats)
    windowRange = autoWindowRange(voxels) if autoWindow else None
    valueRange = (float(np.nanmin(voxels)), float(np.nanmax(voxels))) if autoWindow and voxels.size else None
    blocks = blockMeans(voxels, blockMaxSize) if blockMaxSize and max(voxels.shape) > blockMaxSize else None
    return VolumeData(voxels, ijkToRas, windowRange, blocks, valueRange)


def _headerChecked(path):
    """A SimpleITK reader of ``path`` whose header is within the voxel limit (``anymc3d.safeio.MAX_VOXELS``),
    checked before a voxel is read: a small file may declare billions of voxels. ValueError names the file."""
    import SimpleITK as sitk  # shipped with Slicer
    from anymc3d.safeio import check_voxels

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    check_voxels(path, reader.GetSize())
    return reader


class _ImageBuffer:
    """A SimpleITK image's voxel buffer for numpy (``np.asarray``) that holds the image: every array made from it
    has this object as its base, so the buffer lives as long as any of them (SimpleITK's GetArrayViewFromImage is
    valid only while the image lives; VTK keeps the array it wraps)."""

    def __init__(self, image):
        import SimpleITK as sitk

        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


#: Slicer's automatic window: the 0.1th to 99.9th intensity percentile (vtkMRMLScalarVolumeDisplayNode::
#: CalculateAutoLevels, Slicer/Slicer 583e9b3 Libs/MRML/Core/vtkMRMLScalarVolumeDisplayNode.cxx)
AUTO_WINDOW_PERCENTILES = (0.1, 99.9)
#: voxels :func:`autoWindowRange` looks at (a regular subsample): 0.03 s instead of a 1 s histogram of 512x512x300
AUTO_WINDOW_SAMPLES = 2_000_000


def autoWindowRange(voxels):
    """``(low, high)``: Slicer's automatic window/level range (its percentiles) of ``voxels``, computed on a regular
    subsample of at most AUTO_WINDOW_SAMPLES voxels. Why: the display node's own automatic window computes a
    histogram of the whole volume on the event loop (1 s for 512x512x300 voxels); a subsample gives the same
    range to a fraction of the intensity range (tested against the display node's). NaN voxels are ignored."""
    voxels = np.asarray(voxels)
    step = max(1, int(np.ceil((voxels.size / AUTO_WINDOW_SAMPLES) ** (1 / 3))))
    sample = voxels[::step, ::step, ::step].ravel()
    sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if sample.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(sample, AUTO_WINDOW_PERCENTILES)
    return float(low), float(high)


def volumeNodeFromArray(voxels, ijkToRas, name, node=None):
    """A scalar volume node (not added to a scene) holding ``voxels`` (K, J, I) at ``ijkToRas``.

    The node's image shares the array's memory (no copy: 0.3 s per 512x512x300 float volume); the VTK array keeps
    the numpy array alive (``numpy_to_vtk``'s reference), so the caller must not change it afterwards.
    """
    voxels = np.ascontiguousarray(voxels)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=False)
    scalars.SetName("ImageScalars")
    imageData.GetPointData().SetScalars(scalars)
    node = node if node is not None else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    matrix = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(ijkToRas[i][j]))
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(imageData)
    return node


def loadHeatmapVolume(scene, path, referenceVolumeNode, name, data=None):
    """Read a backend heatmap file into a new scalar volume with exactly the reference volume's IJK-to-RAS.

    The file must have the reference's geometry (cli-contract.md); it is checked, then the matrix is copied so
    that the file's float rounding cannot shift the overlay. ``data``: the file already read by
    :func:`readVolumeFile` (the same checks apply).
    """
    heatmapNode = _checkedHeatmapNode(path, referenceVolumeNode, name, data)
    _addHeatmapNode(scene, heatmapNode, referenceVolumeNode)
    return heatmapNode


def pendingHeatmapVolume(scene, path, referenceVolumeNode, name):
    """A heatmap node whose file is still being read: the reference's geometry, no voxels yet (slice views show
    nothing of it), ``path`` in its PENDING_FILE_ATTRIBUTE until :func:`fillHeatmapVolume` gives it the file's
    voxels (with the checks of :func:`loadHeatmapVolume`). Lets a viewer show one finding while the others load."""
    heatmapNode = slicer.vtkMRMLScalarVolumeNode()
    heatmapNode.SetName(name)
    copyGeometryExactly(heatmapNode, referenceVolumeNode)
    _addHeatmapNode(scene, heatmapNode, referenceVolumeNode)
    heatmapNode.SetAttribute(PENDING_FILE_ATTRIBUTE, str(path))
    return heatmapNode


def pendingHeatmapFile(heatmapNode):
    """The file a pending heatmap node (:func:`pendingHeatmapVolume`) waits for, or None when it has its voxels."""
    return heatmapNode.GetAttribute(PENDING_FILE_ATTRIBUTE) if heatmapNode is not None else None


def fillHeatmapVolume(heatmapNode, referenceVolumeNode, data=None):
    """Give a pending heatmap node its file's voxels (``data``: the file already read), checked as
    :func:`loadHeatmapVolume` checks them. Raises ValueError naming the file (the node then stays pending)."""
    path = pendingHeatmapFile(heatmapNode)
    if path is None:
        raise ValueError(f"{heatmapNode.GetName()} is not waiting for a file")
    checked = _checkedHeatmapNode(path, referenceVolumeNode, heatmapNode.GetName(), data)
    heatmapNode.SetAndObserveImageData(checked.GetImageData())
    heatmapNode.RemoveAttribute(PENDING_FILE_ATTRIBUTE)
    return heatmapNode


def _checkedHeatmapNode(path, referenceVolumeNode, name, data=None):
    """A heatmap file (or its ``data``) as a node outside the scene, checked against the reference's size and
    geometry, with the reference's exact IJK-to-RAS."""
    if data is not None:
        heatmapNode = volumeNodeFromArray(data[0], data[1], name)
    else:
        try:
            _headerChecked(path)
        except RuntimeError:
            raise ValueError(f"Cannot read heatmap file {path}") from None
        reader = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not added to the scene: used only to read
        reader.SetFileName(str(path))
        heatmapNode = slicer.vtkMRMLScalarVolumeNode()
        heatmapNode.SetName(name)
        if not reader.ReadData(heatmapNode):
            raise ValueError(f"Cannot read heatmap file {path}")
    expectedDims = referenceVolumeNode.GetImageData().GetDimensions()
    if heatmapNode.GetImageData().GetDimensions() != expectedDims:
        raise ValueError(f"Heatmap {path} has size {heatmapNode.GetImageData().GetDimensions()}, "
                         f"the input has {expectedDims}")
    reference = matrixToArray(ijkToRasMatrix(referenceVolumeNode))
    scale = max(1.0, float(np.abs(reference).max()))
    if not np.allclose(matrixToArray(ijkToRasMatrix(heatmapNode)), reference, rtol=0, atol=1e-4 * scale):
        raise ValueError(f"Heatmap {path} does not have the input's geometry")
    copyGeometryExactly(heatmapNode, referenceVolumeNode)
    return heatmapNode


def _addHeatmapNode(scene, heatmapNode, referenceVolumeNode):
    scene.AddNode(heatmapNode)
    if referenceVolumeNode.GetParentTransformNode() is not None:
        heatmapNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetParentTransformNode().GetID())
    heatmapNode.SetAttribute(ROLE_ATTRIBUTE, "heatmap")
    heatmapNode.AddDefaultStorageNode()  # no file name yet: written when the scene is saved


def createDisplayNodeWithWindow(volumeNode, windowRange):
    """The display node ``CreateDefaultDisplayNodes`` makes (default colour map; Slicer 583e9b3
    Libs/MRML/Core/vtkMRMLScalarVolumeNode.cxx), with the window ``(low, high)`` set instead of computed: the automatic
    window's whole-volume histogram (1 s for 512x512x300 voxels) is never run."""
    displayNode = volumeNode.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    if not displayNode.GetColorNodeID():
        displayNode.SetDefaultColorMap()
    displayNode.SetAutoWindowLevel(False)
    displayNode.SetWindowLevelMinMax(float(windowRange[0]), float(windowRange[1]))
    volumeNode.SetAndObserveDisplayNodeID(displayNode.GetID())
    return displayNode


def valueRangeOf(volumeNode):
    """The image's lowest and highest value: kept by the Logic's loadInputFile when the file was read off the event
    loop (``VolumeData.valueRange``), else VTK's GetScalarRange (a pass over every voxel: 1 s at 512x512x300)."""
    value = volumeNode.GetAttribute(VALUE_RANGE_ATTRIBUTE)
    if value:
        return tuple(float(v) for v in value.split())
    return tuple(volumeNode.GetImageData().GetScalarRange())


def autoWindowOf(volumeNode):
    """The automatic window ``(low, high)`` the Logic's loadInputFile kept (``VolumeData.windowRange``), or None."""
    value = volumeNode.GetAttribute(AUTO_WINDOW_ATTRIBUTE) if volumeNode is not None else None
    return tuple(float(v) for v in value.split()) if value else None


def setUpHeatmapDisplay(heatmapNode, colorNode, threshold):
    """Slice-view display: the inferno colour table spread over [threshold, 1] (:func:`setHeatmapWindow`).

    The display node is set up before it observes the heatmap (not ``CreateDefaultDisplayNodes``, whose automatic
    window/level computes a histogram of the whole volume first: 2 s for 512x512x300 voxels, thrown away here).
    """
    displayNode = heatmapNode.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    displayNode.SetAutoWindowLevel(False)
    displayNode.SetAutoThreshold(False)
    displayNode.SetApplyThreshold(True)
    setHeatmapWindow(displayNode, threshold)
    displayNode.SetAndObserveColorNodeID(colorNode.GetID())
    heatmapNode.SetAndObserveDisplayNodeID(displayNode.GetID())
    return displayNode


def setHeatmapWindow(displayNode, threshold):
    """The heatmap's colours over [threshold, 1]: inferno's black at the threshold, so the slice views' "Add"
    compositing (:func:`showHeatmapInSliceViews`) adds nothing there (inferno's first colour, nearly black) and
    a tint that grows with the value above it. The threshold also sets the display's alpha cut, which matters
    only if a view alpha-blends."""
    threshold = float(threshold)
    displayNode.SetWindowLevelMinMax(min(threshold, 0.99), 1.0)
    displayNode.SetThreshold(threshold, 1.0)


def createFindingsTable(scene, name, rows):
    """Table node with one row per finding. ``rows``: dicts with the keys of TABLE_COLUMNS."""
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for column in TABLE_COLUMNS:
        array = vtk.vtkDoubleArray() if column in ("Probability", "Threshold") else vtk.vtkStringArray()
        array.SetName(column)
        tableNode.AddColumn(array)
    table = tableNode.GetTable()
    for row in rows:
        index = tableNode.AddEmptyRow()
        for columnIndex, column in enumerate(TABLE_COLUMNS):
            value = row[column]
            if isinstance(value, float):
                table.SetValue(index, columnIndex, vtk.vtkVariant(value))
            else:
                tableNode.SetCellText(index, columnIndex, str(value))
    tableNode.SetColumnDescription("Probability", "Calibrated probability (Platt scaling)")
    tableNode.SetColumnDescription("Decision", "Calibrated probability at or above the plugin's threshold")
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)  # results: not editable in the table view
    tableNode.SetAttribute(ROLE_ATTRIBUTE, "findings")
    tableNode.Modified()
    tableNode.AddDefaultStorageNode()
    return tableNode


def createImportanceChart(scene, name, slicingAxis, importanceByPlugin):
    """Table of slice index vs importance (a column per plugin), a line series per plugin, one chart."""
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
    numSlices = len(next(iter(importanceByPlugin.values())))
    sliceArray = numpy_support.numpy_to_vtk(np.arange(numSlices, dtype=np.float64), deep=True)
    sliceArray.SetName("Slice")
    tableNode.AddColumn(sliceArray)
    for plugin, importance in importanceByPlugin.items():
        column = numpy_support.numpy_to_vtk(np.asarray(importance, dtype=np.float64), deep=True)
        column.SetName(plugin)
        tableNode.AddColumn(column)
    tableNode.SetAttribute(ROLE_ATTRIBUTE, "importance")
    tableNode.AddDefaultStorageNode()

    chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chartNode.SetTitle(name)
    chartNode.SetXAxisTitle(f"Slice index ({'IJK'[slicingAxis]})")
    chartNode.SetYAxisTitle("Importance")
    seriesNodes = []
    for index, plugin in enumerate(importanceByPlugin):
        seriesNode = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {plugin}")
        seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
        seriesNode.SetXColumnName("Slice")
        seriesNode.SetYColumnName(plugin)
        seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        seriesNode.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        seriesNode.SetColor(*heatmapColor(1.0 - index / max(1, len(importanceByPlugin))))
        chartNode.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
        seriesNodes.append(seriesNode)
    chartNode.SetAttribute(ROLE_ATTRIBUTE, "chart")
    return tableNode, chartNode, seriesNodes


def showHeatmapInSliceViews(scene, heatmapNode, backgroundVolumeNode, opacity):
    """Heatmap as foreground of every slice view present (none on slicer-core without views)."""
    for compositeNode in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        if backgroundVolumeNode is not None and not compositeNode.GetBackgroundVolumeID():
            compositeNode.SetBackgroundVolumeID(backgroundVolumeNode.GetID())
        compositeNode.SetForegroundVolumeID(heatmapNode.GetID() if heatmapNode is not None else None)
    setOverlayOpacity(scene, opacity)


def setOverlayOpacity(scene, opacity):
    """The slice views add the heatmap to the image (Slicer's "Add" compositing: image + opacity x colour). Alpha
    blending would cut the overlay out at the threshold instead, and the untinted image there would look brighter
    than its tinted surroundings."""
    for compositeNode in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        compositeNode.SetCompositing(slicer.vtkMRMLSliceCompositeNode.Add)
        compositeNode.SetForegroundOpacity(float(opacity))


def placeInSubjectHierarchy(scene, inputNode, folderName, nodes):
    """Put ``nodes`` in a folder under the input's study (or under the input's parent when there is no study)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    inputItem = shNode.GetItemByDataNode(inputNode)
    if not inputItem:
        inputItem = shNode.CreateItem(shNode.GetSceneItemID(), inputNode)
    studyLevel = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    parentItem = shNode.GetItemParent(inputItem)
    item = parentItem
    while item and item != shNode.GetSceneItemID():
        if shNode.GetItemLevel(item) == studyLevel:
            parentItem = item
            break
        item = shNode.GetItemParent(item)
    folderItem = shNode.CreateFolderItem(parentItem, folderName)
    for node in nodes:
        nodeItem = shNode.GetItemByDataNode(node)
        if nodeItem:
            shNode.SetItemParent(nodeItem, folderItem)
        else:
            shNode.CreateItem(folderItem, node)
    return folderItem


def placeBeside(scene, node, sibling):
    """Put ``node`` in the subject hierarchy folder of ``sibling``."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(sibling))
    nodeItem = shNode.GetItemByDataNode(node)
    if nodeItem:
        shNode.SetItemParent(nodeItem, parentItem)
    else:
        shNode.CreateItem(parentItem, node)


def nodeRole(node):
    """What an AnyMC3D output node is ("heatmap", "findings", "importance", "chart", ...), or None for any other
    node (inputs included)."""
    return node.GetAttribute(ROLE_ATTRIBUTE) if node is not None else None


def nodesByClass(scene, className):
    """The scene's nodes of ``className`` (subclasses included), as a list."""
    collection = scene.GetNodesByClass(className)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def removeNode(scene, node):
    """Remove ``node`` with its display and storage nodes (``scene.RemoveNode`` alone leaves them in the scene)."""
    for dependent in [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] + [node.GetStorageNode()]:
        if dependent is not None:
            scene.RemoveNode(dependent)
    scene.RemoveNode(node)


# The 3D view (rendering.py), under the names callers have used from this module.
from .rendering import (  # noqa: F401 - re-exported; last: rendering.py takes its helpers from here
    MAX_VOLUME_RENDERING_OPACITY,
    VOLUME_RENDERING_COPY_REFERENCE,
    blockFactors,
    blockMeans,
    reducedVolumeRenderingCopy,
    setHeatmapTransferFunctions,
    setUpVolumeRendering,
    volumeRenderingDisplayNodes,
)
