"""The 3D view of a heatmap: its volume rendering display, transfer functions, and the block-averaged copy a
large heatmap is rendered from (the slice views keep the full-resolution heatmap).

Only MRML / logic classes, vtk and numpy, as ``outputs``; the node helpers come from ``outputs`` at call time
(``outputs`` re-exports this module's names for its callers).
"""

import numpy as np

MAX_VOLUME_RENDERING_OPACITY = 0.6
#: heatmap node --> the reduced copy its 3D view renders (DisplayOptions.volumeRenderingMaxSize)
VOLUME_RENDERING_COPY_REFERENCE = "AnyMC3DVolumeRenderingCopy"


def setUpVolumeRendering(volumeRenderingLogic, heatmapNode, threshold, visible, maxSize=0, blocks=None):
    """3D display: a volume rendering display node with the heatmap transfer functions.

    With ``maxSize`` > 0 and a heatmap larger than that along any axis, the 3D view renders a block-averaged copy
    of at most ``maxSize`` voxels per axis (:func:`reducedVolumeRenderingCopy`) instead of the full volume: the
    slice views still show the full-resolution heatmap (``blocks``: its block means, already computed). Returns
    the volume rendering display node.
    """
    source = heatmapNode
    if maxSize and max(heatmapNode.GetImageData().GetDimensions()) > int(maxSize):
        source = reducedVolumeRenderingCopy(heatmapNode, int(maxSize), blocks)
    displayNode = volumeRenderingLogic.CreateDefaultVolumeRenderingNodes(source)
    propertyNode = displayNode.GetVolumePropertyNode()
    propertyNode.SetName(f"{heatmapNode.GetName()} transfer function")
    setHeatmapTransferFunctions(propertyNode.GetVolumeProperty(), threshold)
    propertyNode.Modified()
    displayNode.SetVisibility(bool(visible))
    return displayNode


def blockFactors(shape, maxSize):
    """Block size per numpy axis that brings ``shape`` to at most ``maxSize`` per axis."""
    return tuple(max(1, -(-int(n) // int(maxSize))) for n in shape)


def blockMeans(voxels, maxSize):
    """``(means, factors)``: ``voxels`` (K, J, I) averaged over blocks of whole voxels, ``factors`` (fk, fj, fi) the
    block size per axis, so that no axis exceeds ``maxSize``. Pure numpy (runs in a reading thread)."""
    factors = blockFactors(voxels.shape, maxSize)
    padding = [(0, (-n) % f) for n, f in zip(voxels.shape, factors)]
    if any(after for _, after in padding):
        voxels = np.pad(voxels, padding, mode="edge")  # a partial last block averages its real voxels' edge value
    (k, j, i), (fk, fj, fi) = [n // f for n, f in zip(voxels.shape, factors)], factors
    # one block row of slices at a time into reused buffers (3x faster than whole-volume passes, which fault in a
    # third of the volume's size of fresh memory), each pass over contiguous memory
    means = np.empty((k, j, i), dtype=np.float32)
    plane = np.empty(voxels.shape[1:], dtype=np.float32)
    for z in range(k):
        np.sum(voxels[z * fk:(z + 1) * fk], axis=0, dtype=np.float32, out=plane)
        means[z] = plane.reshape(j, fj, voxels.shape[2]).sum(axis=1).reshape(j, i, fi).sum(axis=2)
    means /= np.float32(fk * fj * fi)
    return means, factors


def reducedVolumeRenderingCopy(heatmapNode, maxSize, blocks=None):
    """A copy of ``heatmapNode`` averaged over blocks of whole voxels so that no axis exceeds ``maxSize`` voxels,
    at the same place in RAS (each copy voxel sits at the centre of its block), referenced from the heatmap.
    ``blocks``: :func:`blockMeans` of the heatmap's voxels, already computed (e.g. in the thread that read it).

    Why: a software renderer (Mesa llvmpipe, the web review's server) ray-casts a 512x512x300 volume in seconds
    per frame; a backend heatmap is a patch-grid map (one value per 14-16 pixel patch, interpolated), so blocks of
    a few voxels lose nothing that is in the data. Hand-written with numpy (one reshape-mean) because the block
    geometry must be exact; vtkImageShrink3D would need the same origin bookkeeping around it.
    """
    from .outputs import (
        ROLE_ATTRIBUTE,
        arrayFromVolumeNode,
        createDisplayNodeWithWindow,
        ijkToRasMatrix,
        matrixToArray,
        volumeNodeFromArray,
    )

    dimensions = heatmapNode.GetImageData().GetDimensions()
    if blocks is None or tuple(blocks[1]) != blockFactors(dimensions[::-1], maxSize):  # made for another size
        blocks = blockMeans(arrayFromVolumeNode(heatmapNode), maxSize)
    small, (fk, fj, fi) = blocks
    k, j, i = small.shape
    # copy IJK -> heatmap IJK: i_full = f * i_copy + (f - 1) / 2 per axis (I, J, K = numpy axes 2, 1, 0)
    blockToFull = np.array([[fi, 0, 0, (fi - 1) / 2.0], [0, fj, 0, (fj - 1) / 2.0], [0, 0, fk, (fk - 1) / 2.0],
                            [0, 0, 0, 1.0]])
    ijkToRas = matrixToArray(ijkToRasMatrix(heatmapNode)) @ blockToFull
    copyNode = volumeNodeFromArray(small, ijkToRas, f"{heatmapNode.GetName()} (3D view, {i}x{j}x{k})")
    heatmapNode.GetScene().AddNode(copyNode)
    copyNode.SetHideFromEditors(True)  # a display aid, not a result: the heatmap node is the result
    copyNode.SetAttribute(ROLE_ATTRIBUTE, "heatmap 3D view copy")
    if heatmapNode.GetParentTransformNode() is not None:
        copyNode.SetAndObserveTransformNodeID(heatmapNode.GetParentTransformNode().GetID())
    if heatmapNode.GetDisplayNode() is not None:  # the volume rendering logic copies the scalar display's colours
        createDisplayNodeWithWindow(copyNode, (0.0, 1.0))  # a heatmap's window; no histogram of the copy
        copyNode.GetDisplayNode().SetAndObserveColorNodeID(heatmapNode.GetDisplayNode().GetColorNodeID())
    heatmapNode.SetNodeReferenceID(VOLUME_RENDERING_COPY_REFERENCE, copyNode.GetID())
    return copyNode


def volumeRenderingDisplayNodes(heatmapNode):
    """The volume rendering display nodes that show ``heatmapNode`` in 3D: its own, or its reduced copy's."""
    nodes = [heatmapNode]
    copyNode = heatmapNode.GetNodeReference(VOLUME_RENDERING_COPY_REFERENCE)
    if copyNode is not None:
        nodes.append(copyNode)
    found = []
    for node in nodes:
        for index in range(node.GetNumberOfDisplayNodes()):
            displayNode = node.GetNthDisplayNode(index)
            if displayNode is not None and displayNode.IsA("vtkMRMLVolumeRenderingDisplayNode"):
                found.append(displayNode)
    return found


def setHeatmapTransferFunctions(volumeProperty, threshold):
    """Scalar opacity: 0 up to ``threshold``, then a linear ramp to MAX_VOLUME_RENDERING_OPACITY at 1; colours inferno over [0, 1]."""
    from .outputs import HEATMAP_COLOR_STOPS

    threshold = min(max(float(threshold), 0.0), 0.99)
    opacity = volumeProperty.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(threshold, 0.0)
    opacity.AddPoint(1.0, MAX_VOLUME_RENDERING_OPACITY)
    colors = volumeProperty.GetRGBTransferFunction()
    colors.RemoveAllPoints()
    for value, (r, g, b) in HEATMAP_COLOR_STOPS:
        colors.AddRGBPoint(value, r, g, b)
    volumeProperty.SetInterpolationTypeToLinear()
    volumeProperty.ShadeOff()
    # The default gradient opacity is 1 everywhere: no effect on screen, but the ray caster would still compute a
    # gradient at every sample (about 2.5x the render time on a software renderer).
    volumeProperty.DisableGradientOpacityOn()
