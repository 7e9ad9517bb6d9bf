"""The widget's results section: the findings table of a run, the heatmap it shows, and jumps to its maximum or most
important slice. A mixin of the module's widget (``self.ui``, ``self.logic``, ``self._parameterNode``)."""

import AnyMC3DSlicerLogic as LogicPackage


class ResultSection:
    """Findings table and navigation of AnyMC3DSlicerWidget."""

    def onResultTableChanged(self, tableNode):
        self.ui.findingsTableView.setMRMLTableNode(tableNode)
        enabled = LogicPackage.nodeRole(tableNode) == "findings"
        self.ui.jumpToMaximumButton.enabled = self.ui.jumpToSliceButton.enabled = enabled

    def selectedRow(self):
        """The table-node row of the selected findings row (0 when none). The view may sort: its index is mapped to
        the source model, whose rows are the table's (qMRMLTableModel::mrmlTableRowIndex is not callable from
        Python: not a slot, Q_INVOKABLE or property)."""
        view = self.ui.findingsTableView
        indexes = view.selectionModel().selectedIndexes() if view.selectionModel() else []
        if not indexes:
            return 0
        return int(view.sortFilterProxyModel().mapToSource(indexes[0]).row())

    def onFindingSelected(self):
        tableNode = self._parameterNode.resultTable
        if tableNode is not None:
            self.logic.selectFinding(tableNode, self.selectedRow(), self._parameterNode.display)

    def updateHeatmapDisplay(self):
        tableNode = self._parameterNode.resultTable if self._parameterNode else None
        if tableNode is None:
            return
        heatmapNode = self.logic.heatmapNodeForRow(tableNode, self.selectedRow())
        self.logic.setHeatmapThreshold(heatmapNode, self._parameterNode.display.threshold)
        self.logic.selectFinding(tableNode, self.selectedRow(), self._parameterNode.display)

    def onJumpToMaximum(self):
        tableNode = self._parameterNode.resultTable
        self.logic.jumpSlicesTo(self.logic.heatmapMaximumRAS(self.logic.heatmapNodeForRow(tableNode, self.selectedRow())))

    def onJumpToSlice(self):
        self.logic.jumpSlicesTo(self.logic.mostImportantSliceRAS(self._parameterNode.resultTable, self.selectedRow()))
