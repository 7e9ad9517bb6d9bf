"""What the slice and 3D views show of the shown case besides its image: the overlay's opacity, the crosshair of
a jump, jumps (maximum, most important slice, a chart click), scrolling, orientation letters, the cursor, the
slice-importance series."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from AnyMC3DSlicerLogic import outputs as logic_outputs

#: the crosshair's colour: cyan, which matplotlib's inferno (black, purple, red, orange, yellow) never takes,
#: so it stays visible on the heatmap's peak
CROSSHAIR_COLOR = (0.0, 0.9, 1.0)
RAS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) direction of R, A, S


class SliceDisplay:
    """The ReviewSession's view handling (a mixin: uses ``self.scene``, ``self.views``, ``self.current``,
    ``self.display``, ``self.logic`` and ``self.row``)."""

    def set_opacity(self, opacity: float):
        self.display.opacity = min(max(float(opacity), 0.0), 1.0)
        self._apply_overlay_opacity()

    def set_overlay_visible(self, visible: bool):
        """Show or hide the heatmap overlay of the slice views (the opacity slider keeps its value)."""
        self.overlay_visible = bool(visible)
        self._apply_overlay_opacity()

    def _apply_overlay_opacity(self):
        """The Logic's overlay: added to the image, its colour map over [threshold, 1] (``outputs.setOverlayOpacity``,
        ``outputs.setHeatmapWindow``); a hidden overlay is opacity 0."""
        logic_outputs.setOverlayOpacity(self.scene, self.display.opacity if self.overlay_visible else 0.0)
        for loaded in self.loaded.values():
            for heatmap in loaded.heatmap_nodes():
                display_node = heatmap.GetDisplayNode()
                if display_node is not None:
                    logic_outputs.setHeatmapWindow(display_node, self.display.threshold)

    def hide_crosshair(self):
        """The crosshair marks a jump target of the shown case: a case switch removes it."""
        for crosshair in logic_outputs.nodesByClass(self.scene, "vtkMRMLCrosshairNode"):
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.NoCrosshair)

    def jump_to_maximum(self):
        heatmap = self.shown_heatmap()
        if heatmap is None or logic_outputs.pendingHeatmapFile(heatmap) is not None:
            return None
        ras = self.logic.heatmapMaximumRAS(heatmap)
        self.jump_slices_to(ras)
        return ras

    def jump_to_most_important_slice(self):
        if self.current is None or self.current.table_node is None:
            return None
        ras = self.logic.mostImportantSliceRAS(self.current.table_node, self.row)
        self.jump_slices_to(ras)
        return ras

    def jump_to_slice(self, index: int):
        """Move the slice views to slice ``index`` along the slicing axis (a click on the chart)."""
        if self.current is None or self.current.table_node is None:
            return None
        axis = int(self.current.table_node.GetAttribute(logic_outputs.SLICING_AXIS_ATTRIBUTE))
        ijk = list(self.cursor_ijk(rounded=False) or [0.0, 0.0, 0.0])
        dims = self.current.input_node.GetImageData().GetDimensions()
        ijk[axis] = min(max(int(index), 0), dims[axis] - 1)
        ras = logic_outputs.voxelToRas(self.current.input_node, ijk)
        self.jump_slices_to(ras)
        return ras

    def jump_slices_to(self, ras):
        """Move every slice plane through ``ras`` without panning (the field of view stays on the anatomy).

        The Logic's ``jumpSlicesTo`` centres the views on the point (CenteredJumpSlice), which pushes half a view
        off the image for a point near an edge; OffsetJumpSlice only moves the slices. The crosshair marks it.
        """
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                              slicer.vtkMRMLSliceNode.OffsetJumpSlice)
        for crosshair in logic_outputs.nodesByClass(self.scene, "vtkMRMLCrosshairNode"):
            crosshair.SetCrosshairRAS(float(ras[0]), float(ras[1]), float(ras[2]))
            crosshair.SetCrosshairColor(*CROSSHAIR_COLOR)
            crosshair.SetCrosshairThickness(slicer.vtkMRMLCrosshairNode.Medium)  # 3 px: seen on the peak at a glance
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowSmallBasic)

    def scroll(self, view_name: str, step: int):
        """One slice of the shown image further along view ``view_name``'s normal (Up/Down over the view)."""
        if self.views is None or self.current is None:
            return None
        for view in self.views.get_slice_views():
            if view.get_singleton_tag() == view_name:
                low, high = view.get_slice_range()
                value = min(max(view.get_slice_value() + step * view.get_slice_step(), low), high)
                view.set_slice_value(value)
                return value
        return None

    def orientation(self) -> dict:
        """Per slice view: the anatomical letters at its edges and the slice number / position of the image."""
        result = {}
        if self.current is None:
            return result
        matrix = vtk.vtkMatrix4x4()
        self.current.input_node.GetRASToIJKMatrix(matrix)
        ras_to_ijk = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        dims = self.current.input_node.GetImageData().GetDimensions()
        for slice_node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode"):
            m = slice_node.GetSliceToRAS()
            to_ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
            letters = {}
            for edge, direction in (("right", to_ras[:3, 0]), ("left", -to_ras[:3, 0]), ("top", to_ras[:3, 1]),
                                    ("bottom", -to_ras[:3, 1])):
                axis = int(np.argmax(np.abs(direction)))
                letters[edge] = RAS_LETTERS[axis][int(direction[axis] > 0)]
            normal_ijk = ras_to_ijk[:3, :3] @ to_ras[:3, 2]
            axis = int(np.argmax(np.abs(normal_ijk)))
            index = int(round(float((ras_to_ijk @ to_ras[:, 3])[axis])))
            inside = 0 <= index < dims[axis]
            letters["slice"] = (f"{index + 1}/{dims[axis]}" if inside else "outside") + \
                f" · {slice_node.GetSliceOffset():.1f} mm"
            # the view's in-plane centre (RAS): a jump that pans the view moves it, one that only moves the
            # slice plane does not
            normal = to_ras[:3, 2] / np.linalg.norm(to_ras[:3, 2])
            origin = to_ras[:3, 3]
            letters["center"] = [round(float(v), 3) for v in origin - float(origin @ normal) * normal]
            result[slice_node.GetName()] = letters
        return result

    def importance(self):
        """``(slicing_axis, {plugin: [importance per slice]})`` from the Logic's importance table node."""
        if self.current is None or self.current.table_node is None:
            return None, {}
        table_node = self.current.table_node
        table = table_node.GetNodeReference(logic_outputs.IMPORTANCE_REFERENCE).GetTable()
        series = {}
        for column_index in range(1, table.GetNumberOfColumns()):
            column = table.GetColumn(column_index)
            series[column.GetName()] = [float(column.GetValue(i)) for i in range(column.GetNumberOfTuples())]
        return int(table_node.GetAttribute(logic_outputs.SLICING_AXIS_ATTRIBUTE)), series

    def cursor_ras(self):
        """The point where the three slice planes meet (None without three independent slice views)."""
        normals, offsets = [], []
        for slice_node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode"):
            matrix = slice_node.GetSliceToRAS()
            normal = np.array([matrix.GetElement(i, 2) for i in range(3)])
            origin = np.array([matrix.GetElement(i, 3) for i in range(3)])
            normals.append(normal)
            offsets.append(float(normal @ origin))
        if len(normals) < 3:
            return None
        normals, offsets = np.array(normals[:3]), np.array(offsets[:3])
        if abs(np.linalg.det(normals)) < 1e-6:
            return None
        return tuple(float(x) for x in np.linalg.solve(normals, offsets))

    def cursor_ijk(self, rounded=True):
        """The cursor as a voxel index (I, J, K) of the shown case's input volume."""
        ras = self.cursor_ras()
        if ras is None or self.current is None:
            return None
        matrix = vtk.vtkMatrix4x4()
        self.current.input_node.GetRASToIJKMatrix(matrix)
        ijk = matrix.MultiplyPoint([*ras, 1.0])[:3]
        return [int(round(x)) for x in ijk] if rounded else [float(x) for x in ijk]

    def slice_offsets(self):
        return {node.GetName(): float(node.GetSliceOffset()) for node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode")}

    def reset_views(self, same_geometry=False):
        if self.views is None:
            return
        if not same_geometry:
            for view in self.views.get_slice_views():
                view.fit_view_to_content()
        for view in self.views.get_threed_views():
            view.reset_view()
