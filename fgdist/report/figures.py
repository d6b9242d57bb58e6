"""Matplotlib figures for the library's pictures and plots (fgdist.report.pictures, fgdist.report.comparison)."""

from __future__ import annotations


def new_figure(width: float, height: float, dpi: int):
    """A figure without pyplot: no global backend state, so it is safe inside the trainer, in a
    library and on a machine without a display. `width`, `height` in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig
