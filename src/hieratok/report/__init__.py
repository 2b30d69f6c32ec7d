"""Visual output: image grids, training / analysis plots, result tables and HTML / Markdown reports.

* :mod:`.images` -- reconstruction grids (input | pyramid of each model), pyramid strips,
  sample grids; PNG via Pillow, quantised exactly as the metrics quantise.
* :mod:`.plots` -- loss curves from the trainer's CSV logs, t-SNE density scatter, per-scale
  metric plots (matplotlib, Agg canvas, no display needed).
* :mod:`.table` -- Table-2 style comparisons (``1.07 (-0.40)``) as Markdown, HTML and text.
* :mod:`.html` -- :class:`Report`, a self-contained ``report.html`` with a ``report.md`` twin.
"""

from .html import Report
from .images import (
    ImageGrid,
    pyramid_strip,
    reconstruction_grid,
    render_image_grid,
    save_image_grid,
    save_samples_grid,
    to_uint8,
)
from .plots import ema_smooth, plot_loss_curves, plot_per_scale_metric, plot_tsne, read_csv_log
from .table import (
    MISSING,
    Cell,
    ComparisonTable,
    MetricSpec,
    SimpleTable,
    comparison_table,
    markdown_table,
    simple_table,
    table2_metrics,
)

__all__ = [
    "Report",
    "ImageGrid", "pyramid_strip", "reconstruction_grid", "render_image_grid", "save_image_grid",
    "save_samples_grid", "to_uint8",
    "ema_smooth", "plot_loss_curves", "plot_per_scale_metric", "plot_tsne", "read_csv_log",
    "MISSING", "Cell", "ComparisonTable", "MetricSpec", "SimpleTable", "comparison_table",
    "markdown_table", "simple_table", "table2_metrics",
]
