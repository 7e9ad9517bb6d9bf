"""The shown case's findings: the table's rows (checked against the record), the finding shown, the threshold."""

from __future__ import annotations

from .cases import RecordError


class Findings:
    """The ReviewSession's findings (a mixin: uses ``self.current``, ``self.logic``, ``self.display``,
    ``self.loaded`` and ``self.row``)."""

    def table_rows(self) -> list[dict]:
        """The findings table node's rows (what the Logic wrote), for the page."""
        if self.current is None or self.current.table_node is None:
            return []
        table_node = self.current.table_node
        table = table_node.GetTable()
        checked = _record_rows(self.current.record)
        rows = []
        for row in range(table.GetNumberOfRows()):
            rows.append({"row": row,
                         "plugin": table_node.GetCellText(row, 0),
                         "finding": table_node.GetCellText(row, 1),
                         "probability": float(table.GetValue(row, 2).ToDouble()),
                         "threshold": float(table.GetValue(row, 3).ToDouble()),
                         "decision": table_node.GetCellText(row, 4),
                         "raw": None})
            if row < len(checked) and checked[row]["finding"] == rows[-1]["finding"]:
                rows[-1].update(checked[row])  # calibrated, raw, threshold and decision from the validated record
        return rows

    def heatmap_for_row(self, row: int):
        """The heatmap node of the shown case's findings-table row ``row``; RecordError for anything else."""
        if self.current is None or self.current.table_node is None:
            raise RecordError("No findings shown")
        count = self.current.table_node.GetNumberOfRows()
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < count:
            raise RecordError(f"No finding {row!r}")
        return self.logic.heatmapNodeForRow(self.current.table_node, row)

    def select_finding(self, row: int):
        if self.current is None or self.current.table_node is None:
            return None
        self.heatmap_for_row(row)
        self.row = row
        shown = self.logic.selectFinding(self.current.table_node, row, self.display)
        self._apply_overlay_opacity()  # a hidden overlay stays hidden
        return shown

    def shown_heatmap(self):
        if self.current is None or self.current.table_node is None:
            return None
        return self.logic.heatmapNodeForRow(self.current.table_node, self.row)

    def set_threshold(self, threshold: float):
        self.display.threshold = min(max(float(threshold), 0.0), 1.0)
        for loaded in self.loaded.values():
            for heatmap in loaded.heatmap_nodes():
                self.logic.setHeatmapThreshold(heatmap, self.display.threshold)
        self._apply_overlay_opacity()  # the colour map starts at the threshold


def _record_rows(record) -> list[dict]:
    """The table's rows from a record already checked by ``anymc3d.contract.validate_record`` (results x labels,
    the Logic's row order): calibrated and raw probability, threshold, and the decision recomputed from them
    (the contract's rule: calibrated >= threshold; multiclass: the most probable label)."""
    from anymc3d.contract import decide

    rows = []
    for result in (record or {}).get("results") or []:
        probabilities = result["probabilities"]
        decided = decide(result["task"], result["labels"], probabilities, result["thresholds"])
        for label in result["labels"]:
            positive = decided[label]
            rows.append({"finding": label, "probability": float(probabilities[label]),
                         "raw": float(result["probabilities_raw"][label]), "threshold": float(result["thresholds"][label]),
                         "decision": "positive" if positive else "negative"})
    return rows
