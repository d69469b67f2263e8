"""Pictures: image grids, the live training curves, ranked lists and a query browser."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from PIL import Image

from reid_utils.files import atomic_write


def in_notebook() -> bool:
    """True inside a Jupyter kernel, where figures can be displayed and updated in place."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


class TrainingCurves:
    """One figure, two panels (loss; top-1 error), train and val lines, redrawn in place.

    In a notebook the figure is shown once with a display handle and later redraws replace
    it (no new figure per epoch, no ``clear_output``); it is also saved to ``path`` when given.
    """

    def __init__(self, path: str | os.PathLike | None = None, live: bool | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.live = in_notebook() if live is None else live
        self.handle = None
        self.updates = 0

    def draw(self, history: dict[str, list[float]]) -> plt.Figure:
        """Draw the history (keys ``train_loss``, ``val_loss``, ``train_err``, ``val_err``) as a new figure."""
        fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.2))
        epochs = range(1, len(history["train_loss"]) + 1)
        for phase, style in (("train", "o-"), ("val", "s-")):
            ax_loss.plot(epochs, history[f"{phase}_loss"], style, ms=3, label=phase)
            ax_err.plot(epochs, history[f"{phase}_err"], style, ms=3, label=phase)
        ax_loss.set(title="loss", xlabel="epoch", ylim=(0, None))
        ax_err.set(title="top-1 error", xlabel="epoch", ylim=(0, 1))
        for ax in (ax_loss, ax_err):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        return fig

    def update(self, history: dict[str, list[float]]) -> None:
        fig = self.draw(history)
        try:
            if self.path is not None:  # a reader never sees a half-written picture
                atomic_write(self.path, lambda tmp: fig.savefig(tmp, dpi=80, format=self.path.suffix.lstrip(".")))
            if self.live:
                from IPython.display import display

                if self.handle is None:
                    self.handle = display(fig, display_id=True)
                else:
                    self.handle.update(fig)
        finally:
            plt.close(fig)  # also when the disk is full: no figure left open for the next cell to show
        self.updates += 1


def image_grid(
    rows: list[list[str | os.PathLike]],
    row_titles: list[str] | None = None,
    col_titles: list[list[str]] | None = None,
    cell_size: tuple[float, float] = (1.1, 2.1),
) -> plt.Figure:
    """A grid of image files, one row per list (rows may differ in length)."""
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(cell_size[0] * n_cols, cell_size[1] * len(rows)), squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(Image.open(row[j]).convert("RGB"))
                if col_titles is not None:
                    ax.set_title(col_titles[i][j], fontsize=7)
        if row_titles is not None:
            axes[i][0].text(-0.15, 0.5, row_titles[i], transform=axes[i][0].transAxes, ha="right",
                            va="center", fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


def ranked_list(
    query_path: str | os.PathLike,
    gallery_paths: list[str | os.PathLike],
    is_match: list[bool],
    title: str = "",
    scores: list[float] | None = None,
) -> plt.Figure:
    """The query, then the top gallery images in rank order, framed green (same person) or red.

    Pass the gallery *after* junk removal (see ``metrics.rank_gallery``), so the frames show
    exactly what CMC and AP count.
    """
    return ranked_lists([(query_path, gallery_paths, is_match, title, scores)])


def ranked_lists(rows: list[tuple]) -> plt.Figure:
    """Several ranked lists in one figure, one row each: ``(query, gallery, is_match, title, scores)``."""
    k = max(len(row[1]) for row in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.05 * (k + 1), 2.4 * len(rows)), squeeze=False)
    for ax_row, (query_path, gallery_paths, is_match, title, scores) in zip(axes, rows, strict=True):
        for i, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i > len(gallery_paths):
                ax.axis("off")
                continue
            ax.imshow(Image.open(query_path if i == 0 else gallery_paths[i - 1]).convert("RGB"))
            if i == 0:
                ax.set_title("query", fontsize=8)
                ax.set_ylabel(title, fontsize=8)
                colour, width = "black", 2
            else:
                colour, width = ("tab:green", 4) if is_match[i - 1] else ("tab:red", 4)
                ax.set_title(f"{i}" if scores is None else f"{i}: {scores[i - 1]:.2f}", fontsize=8)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
    fig.tight_layout()
    return fig


def ap_histogram(ap_values, bins: int = 20, title: str = "AP per query") -> plt.Figure:
    """How the average precision spreads over queries: a mean hides a few very bad queries."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.hist(ap_values, bins=bins, range=(0, 1), color="tab:blue", edgecolor="white")
    ax.set(xlabel="average precision", ylabel="queries", title=title)
    fig.tight_layout()
    return fig


class QueryBrowser:
    """Step through the queries: a slider picks one, its ranked list is drawn with its AP.

    ``draw(q)`` makes the figure of query ``q`` (e.g. ``ranked_lists([...])``). In Jupyter with ipywidgets this
    is a slider above the picture, redrawn when the slider moves (the picture is an image widget whose value is
    replaced: one output, updated in place). Wherever widgets do not run -- a static HTML page, GitHub, nbval, a
    kernel without ipywidgets -- the same output shows the picture of the query the slider is on: it travels
    with the widget as a PNG in the same output. Notebooks saved by ``python -m reid_utils.series`` keep only
    that picture (``series.keep_static_pictures``): a reopened notebook has no kernel behind the slider.
    """

    def __init__(self, draw: Callable[[int], plt.Figure], count: int, start: int = 0) -> None:
        if count < 1:
            raise ValueError("QueryBrowser needs at least one query.")
        self.draw, self.count = draw, count
        self.query = start
        self._png = self.render(start)
        self.widget = None
        try:
            import ipywidgets as widgets
        except ImportError:  # the picture alone
            return
        self.slider = widgets.IntSlider(value=start, min=0, max=count - 1, description="query",
                                        continuous_update=False)  # fmt: skip
        self.image = widgets.Image(value=self._png, format="png")
        self.slider.observe(lambda change: self._draw(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.image])

    def render(self, query: int) -> bytes:
        """The picture of one query as PNG bytes (the figure is closed: nothing else is displayed)."""
        fig = self.draw(query)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    def show(self, query: int) -> None:
        """Go to another query, as moving the slider does."""
        if not 0 <= query < self.count:
            raise ValueError(f"query must be between 0 and {self.count - 1}, got {query}.")
        if self.widget is not None:
            self.slider.value = query  # its observer draws
        else:
            self._draw(query)

    def _draw(self, query: int) -> None:
        self.query = query
        self._png = self.render(query)
        if self.widget is not None:
            self.image.value = self._png

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        text = f"QueryBrowser over {self.count} queries, showing query {self.query} (move the slider in Jupyter)"
        bundle = {"text/plain": text, "image/png": base64.b64encode(self._png).decode("ascii")}
        if self.widget is not None:
            view = self.widget._repr_mimebundle_(include=include, exclude=exclude)
            bundle["application/vnd.jupyter.widget-view+json"] = view["application/vnd.jupyter.widget-view+json"]
        return bundle
