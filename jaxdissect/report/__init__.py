"""The dissection report: strips of top images, plots and static HTML pages."""

from jaxdissect.report.html import LayerPage, RunInfo, UnitCard, layer_file_stems, write_report
from jaxdissect.report.plots import (
    category_colors,
    plot_detectors_per_concept,
    plot_unique_detectors,
)
from jaxdissect.report.strips import save_png, unit_strip

__all__ = [
    "LayerPage",
    "RunInfo",
    "UnitCard",
    "category_colors",
    "layer_file_stems",
    "plot_detectors_per_concept",
    "plot_unique_detectors",
    "save_png",
    "unit_strip",
    "write_report",
]
