"""Figures for kvfactory results, drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend).

Shared helpers (:func:`new_figure`, :func:`save_figure`, :func:`draw_heatmap`) are meant for every plot kind (PPL,
latency, ...); the needle-in-a-haystack figures come first:

- :func:`needle_grid`: the (depth × context length) table of mean scores read from a folder of needle cells
  (:mod:`kvfactory.benchmarks.needle_scoring`);
- :func:`plot_needle_heatmap`: one run, KVCache-Factory's look (red → amber → green, fixed 0–1 scale);
- :func:`plot_needle_comparison`: several runs (methods) of one model, one panel each, one shared colour scale.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

__all__ = [
    "NEEDLE_COLORS", "MISSING_COLOR", "needle_cmap", "new_figure", "save_figure", "draw_heatmap", "NeedleGrid",
    "needle_grid", "plot_needle_heatmap", "plot_needle_comparison",
]

logger = logging.getLogger(__name__)

NEEDLE_COLORS = ("#F0496E", "#EBB839", "#0CD79F")
"""gkamradt's and KVCF's red → amber → green."""
MISSING_COLOR = "#D9D9D9"
"""Cells with no result (light grey; never drawn as a score of 0)."""
METRIC_LABELS = {"recall": "recall", "rouge1_f": "ROUGE-1 F"}


# ---------------------------------------------------------------------------------------------------- generic parts
def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Figure:
    """A figure on its own Agg canvas (safe in scripts, tests and servers; pyplot's state is not touched)."""
    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_path: str | Path, *, dpi: int = 150) -> Path:
    """Save ``figure`` (format from the suffix; parent folders created) and return the path."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, facecolor="white")
    logger.info("wrote %s", path)
    return path


def _tick_positions(count: int, max_labels: int) -> list[int]:
    step = max(1, math.ceil(count / max_labels))
    return list(range(0, count, step))


def _number_label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def draw_heatmap(ax: Axes, values: np.ndarray, row_labels: Sequence[Any], col_labels: Sequence[Any], *,
                 cmap: Colormap, vmin: float, vmax: float, annotate: bool | None = None, fmt: str = "{:.2f}",
                 max_xticks: int = 20, max_yticks: int = 25, grid_color: str = "white") -> AxesImage:
    """Draw a rows × columns table as coloured cells, row 0 at the top; NaN cells take ``cmap``'s "bad" colour.

    Parameters
    ----------
    annotate
        Write each value in its cell; ``None`` does so when the table has at most 160 cells.
    max_xticks, max_yticks
        At most this many tick labels per axis (every k-th label otherwise); long x labels are rotated.
    """
    data = np.ma.masked_invalid(np.asarray(values, dtype=float))
    rows, cols = data.shape
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    x_ticks = _tick_positions(cols, max_xticks)
    y_ticks = _tick_positions(rows, max_yticks)
    ax.set_xticks(x_ticks, [_number_label(col_labels[i]) for i in x_ticks])
    ax.set_yticks(y_ticks, [_number_label(row_labels[i]) for i in y_ticks])
    longest = max((len(_number_label(label)) for label in col_labels), default=0)
    if len(x_ticks) * max(longest, 3) > 60:
        for label in ax.get_xticklabels():
            label.set_rotation(45)
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color=grid_color, linewidth=1.0 if rows * cols <= 400 else 0.4)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=3)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate is None:
        annotate = rows * cols <= 160
    if annotate:
        size = 9 if cols <= 12 else 7
        for r in range(rows):
            for c in range(cols):
                if not np.ma.is_masked(data[r, c]):
                    ax.text(c, r, fmt.format(float(data[r, c])), ha="center", va="center", fontsize=size,
                            color="#1a1a1a")
    return image


# ------------------------------------------------------------------------------------------------------ needle plots
def needle_cmap() -> Colormap:
    """The red → amber → green colormap, with :data:`MISSING_COLOR` for missing cells."""
    return LinearSegmentedColormap.from_list("needle", list(NEEDLE_COLORS)).with_extremes(bad=MISSING_COLOR)


@dataclass
class NeedleGrid:
    """Mean scores of a needle run: ``values[i, j]`` is depth ``depths[i]`` at length ``lengths[j]`` (NaN: no cell).

    ``counts`` holds how many records each cell averages; ``mean`` is the mean over the non-missing cells.
    """

    values: np.ndarray
    counts: np.ndarray
    depths: list[float]
    lengths: list[int]
    metric: str
    model: str
    method: str
    budget: str

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.values)) if np.isfinite(self.values).any() else float("nan")

    @property
    def missing(self) -> int:
        return int((self.counts == 0).sum())


def _budget_text(value: Any) -> str:
    if value is None or value == "" or value == -1:
        return "full"
    return str(value)


def _unique_text(records: list[dict[str, Any]], key: str, render: Any = str) -> str:
    values = sorted({render(record.get(key)) for record in records})
    if len(values) > 1:
        logger.warning("needle cells disagree on %s: %s", key, ", ".join(values))
    return " / ".join(values)


def needle_grid(cells: str | Path | Iterable[dict[str, Any]], metric: str = "recall") -> NeedleGrid:
    """The (depth × length) table of mean ``metric`` from a results folder (or already-read cell records).

    Rows are the depths and columns the context lengths that occur in the records, both ascending; duplicate
    records of one cell are averaged (as the upstream pivot tables do).

    Raises
    ------
    ValueError
        When there are no cells, or a record lacks ``metric``.
    """
    from kvfactory.benchmarks.needle_scoring import read_cells

    records = read_cells(cells) if isinstance(cells, (str, Path)) else list(cells)
    if not records:
        raise ValueError(f"no needle cells in {cells}" if isinstance(cells, (str, Path)) else "no needle cells given")
    depths = sorted({float(record["depth_percent"]) for record in records})
    lengths = sorted({int(record["context_length"]) for record in records})
    row = {depth: i for i, depth in enumerate(depths)}
    col = {length: j for j, length in enumerate(lengths)}
    sums = np.zeros((len(depths), len(lengths)))
    counts = np.zeros((len(depths), len(lengths)), dtype=int)
    for record in records:
        if record.get(metric) is None:
            raise ValueError(f"a needle cell (len {record['context_length']}, depth {record['depth_percent']}) has "
                             f"no {metric!r}; accepted metrics are numeric record fields such as "
                             f"{', '.join(METRIC_LABELS)}")
        i, j = row[float(record["depth_percent"])], col[int(record["context_length"])]
        sums[i, j] += float(record[metric])
        counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return NeedleGrid(values=values, counts=counts, depths=depths, lengths=lengths, metric=metric,
                      model=_unique_text(records, "model"), method=_unique_text(records, "method"),
                      budget=_unique_text(records, "budget", _budget_text))


def _mean_text(grid: NeedleGrid) -> str:
    text = f"mean {METRIC_LABELS.get(grid.metric, grid.metric)} {grid.mean:.3f}"
    if grid.missing:
        text += f" ({grid.missing} of {grid.values.size} cells missing, grey)"
    return text


def _label_axes(ax: Axes, *, x: bool = True, y: bool = True) -> None:
    if x:
        ax.set_xlabel("Context length (tokens)")
    if y:
        ax.set_ylabel("Depth (%)")


def _panel_size(grid: NeedleGrid, cell_width: float = 0.62) -> tuple[float, float]:
    """Inches for one panel: ``cell_width`` per column and 0.38 per row plus margins, clamped to 5–16 × 3.2–10."""
    width = min(max(cell_width * len(grid.lengths) + 1.6, 5.0), 16.0)
    height = min(max(0.38 * len(grid.depths) + 1.4, 3.2), 10.0)
    return width, height


def _run_text(grid: NeedleGrid) -> str:
    return f"{grid.method}, full cache" if grid.budget == "full" else f"{grid.method}, budget {grid.budget}"


def plot_needle_heatmap(results_dir: str | Path, out_png: str | Path | None = None, title: str | None = None, *,
                        metric: str = "recall", annotate: bool | None = None, dpi: int = 150) -> Path:
    """Heatmap of one needle run: rows depth %, columns context length, colour = mean ``metric`` on a fixed 0–1 scale.

    Parameters
    ----------
    results_dir
        Folder of cells written by :func:`kvfactory.benchmarks.needle_scoring.write_cell`.
    out_png
        Where to save; default ``results_dir / "needle_heatmap.png"``.
    title
        First title line; default ``"Needle in a haystack: {model}, {method}, budget {budget}"`` from the records
        (``full cache`` when the records have no budget).
        The overall mean is always added as a second line.
    metric
        Record field to plot: ``recall`` (default) or ``rouge1_f``.
    annotate
        Write values in the cells; default when the grid has at most 160 cells.
    """
    grid = needle_grid(results_dir, metric)
    width, height = _panel_size(grid)
    figure = new_figure(width + 1.3, height + 0.9)
    ax = figure.add_subplot()
    image = draw_heatmap(ax, grid.values, grid.depths, grid.lengths, cmap=needle_cmap(), vmin=0.0, vmax=1.0,
                         annotate=annotate)
    _label_axes(ax)
    heading = title or f"Needle in a haystack: {grid.model}, {_run_text(grid)}"
    ax.set_title(f"{heading}\n{_mean_text(grid)}", fontsize=11)
    colorbar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("Score")
    out = Path(out_png) if out_png is not None else Path(results_dir) / "needle_heatmap.png"
    return save_figure(figure, out, dpi=dpi)


def plot_needle_comparison(results_dirs: Sequence[str | Path], out_png: str | Path, *, metric: str = "recall",
                           layout: str = "auto", title: str | None = None, annotate: bool | None = None,
                           dpi: int = 150) -> Path:
    """One heatmap panel per run (typically one method each, same model), one shared 0–1 colour scale and colorbar.

    Parameters
    ----------
    results_dirs
        Run folders, in panel order.
    layout
        ``"horizontal"`` (side by side), ``"vertical"`` (stacked) or ``"auto"``: side by side while every grid has
        at most 12 lengths and there are at most 3 runs, stacked otherwise.
    title
        Figure title; default ``"Needle in a haystack: {model}"``. Each panel is titled with its method, budget and
        mean.
    """
    if not results_dirs:
        raise ValueError("plot_needle_comparison needs at least one results folder")
    if layout not in ("auto", "horizontal", "vertical"):
        raise ValueError(f"layout must be 'auto', 'horizontal' or 'vertical', got {layout!r}")
    grids = [needle_grid(folder, metric) for folder in results_dirs]
    models = sorted({grid.model for grid in grids})
    if len(models) > 1:
        logger.warning("comparing needle runs of different models: %s", ", ".join(models))
    if layout == "auto":
        layout = "horizontal" if len(grids) <= 3 and max(len(g.lengths) for g in grids) <= 12 else "vertical"
    sizes = [_panel_size(grid, 0.5 if layout == "horizontal" else 0.62) for grid in grids]
    if layout == "horizontal":
        width, height = sum(w for w, _ in sizes) + 1.5, max(h for _, h in sizes) + 1.2
        axes = new_figure(width, height).subplots(1, len(grids), squeeze=False)[0]
    else:
        width, height = max(w for w, _ in sizes) + 1.5, sum(h for _, h in sizes) + 0.9
        axes = new_figure(width, height).subplots(len(grids), 1, squeeze=False)[:, 0]
    figure = axes[0].figure
    same_lengths = all(grid.lengths == grids[0].lengths for grid in grids)
    cmap = needle_cmap()
    image = None
    for index, (ax, grid) in enumerate(zip(axes, grids)):
        image = draw_heatmap(ax, grid.values, grid.depths, grid.lengths, cmap=cmap, vmin=0.0, vmax=1.0,
                             annotate=annotate)
        last = index == len(grids) - 1
        _label_axes(ax, x=layout == "horizontal" or last or not same_lengths, y=layout == "vertical" or index == 0)
        ax.set_title(f"{_run_text(grid)}\n{_mean_text(grid)}", fontsize=10)
    figure.suptitle(title or f"Needle in a haystack: {' / '.join(models)}", fontsize=12)
    colorbar = figure.colorbar(image, ax=list(axes), fraction=0.04 if layout == "horizontal" else 0.05, pad=0.02,
                               aspect=30)
    colorbar.set_label("Score")
    return save_figure(figure, out_png, dpi=dpi)
