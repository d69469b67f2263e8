"""Training curves, image grids, ranked lists and AP histograms (drawn off-screen with Agg)."""

import base64

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from PIL import Image  # noqa: E402

from reid_utils.visualize import TrainingCurves, ap_histogram, image_grid, ranked_list, ranked_lists  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def images(tmp_path):
    """Six small JPEGs of different colours."""
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (16, 32), (40 * i, 200 - 30 * i, 90)).save(path)
        paths.append(path)
    return paths


def history(epochs):
    rng = np.random.default_rng(epochs)
    return {
        "train_loss": list(np.linspace(2.0, 0.5, epochs)),
        "val_loss": list(np.linspace(2.2, 0.8, epochs)),
        "train_err": list(rng.uniform(0, 1, epochs)),
        "val_err": list(rng.uniform(0, 1, epochs)),
    }


# --------------------------------------------------------------------------- TrainingCurves


def test_curves_saved_as_jpeg_without_leftovers(tmp_path):
    path = tmp_path / "train.jpg"
    curves = TrainingCurves(path, live=False)
    curves.update(history(1))
    first = path.read_bytes()
    curves.update(history(3))
    assert curves.updates == 2
    assert curves.handle is None  # nothing displayed when not live
    with Image.open(path) as picture:
        assert picture.format == "JPEG"
        picture.load()
        assert picture.width > picture.height > 50
    assert path.read_bytes() != first  # redrawn, not kept
    assert [p.name for p in tmp_path.iterdir()] == ["train.jpg"]  # no .tmp file left behind
    assert not plt.get_fignums()  # every figure closed


def test_curves_without_path_only_count(tmp_path):
    curves = TrainingCurves(live=False)
    curves.update(history(2))
    assert curves.updates == 1
    assert not list(tmp_path.iterdir())


def test_curves_plot_the_history():
    h = history(4)
    fig = TrainingCurves(live=False).draw(h)
    ax_loss, ax_err = fig.axes
    assert ax_loss.get_yscale() == "linear" and ax_loss.get_ylim()[0] == 0  # as the classic draw_curve, from 0
    for ax, key in ((ax_loss, "loss"), (ax_err, "err")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "val"}
        for phase in ("train", "val"):
            np.testing.assert_allclose(lines[phase].get_xdata(), [1, 2, 3, 4])
            np.testing.assert_allclose(lines[phase].get_ydata(), h[f"{phase}_{key}"])
    plt.close(fig)


# --------------------------------------------------------------------------- image_grid


def test_image_grid_has_rows_times_longest_row_axes(images):
    rows = [images[:3], images[3:4], images[4:6]]
    titles = [["a", "b", "c"], ["d"], ["e", "f"]]
    fig = image_grid(rows, row_titles=["x", "y", "z"], col_titles=titles)
    assert len(fig.axes) == len(rows) * max(len(r) for r in rows) == 9
    grid = np.array(fig.axes).reshape(3, 3)
    for i, row in enumerate(rows):
        for j in range(3):
            assert len(grid[i][j].images) == (1 if j < len(row) else 0)
            if j < len(row):
                assert grid[i][j].get_title() == titles[i][j]
        assert [t.get_text() for t in grid[i][0].texts] == [["x", "y", "z"][i]]
    plt.close(fig)


# --------------------------------------------------------------------------- ranked_list


def _frame_colours(ax):
    return {to_rgba(spine.get_edgecolor()) for spine in ax.spines.values()}


def test_ranked_list_frames_matches_green_and_others_red(images):
    is_match = [True, False, False, True]
    scores = [0.91, 0.8, 0.55, 0.5]
    fig = ranked_list(images[0], images[1:5], is_match, title="query 1", scores=scores)
    assert len(fig.axes) == len(is_match) + 1
    green, red = to_rgba("tab:green"), to_rgba("tab:red")
    assert _frame_colours(fig.axes[0]).isdisjoint({green, red})  # the query is not judged
    assert fig.axes[0].get_title() == "query"
    for rank, (ax, match) in enumerate(zip(fig.axes[1:], is_match, strict=True), start=1):
        assert _frame_colours(ax) == {green if match else red}
        assert ax.get_title() == f"{rank}: {scores[rank - 1]:.2f}"
        assert len(ax.images) == 1
    assert fig.axes[0].get_ylabel() == "query 1"
    plt.close(fig)


def test_ranked_list_without_scores_numbers_the_ranks(images):
    fig = ranked_list(images[0], images[1:3], [False, True])
    assert [ax.get_title() for ax in fig.axes] == ["query", "1", "2"]
    plt.close(fig)


def test_ranked_lists_one_row_per_query_shorter_rows_blank(images):
    rows = [
        (images[0], images[1:4], [False, True, False], "a", None),
        (images[4], images[5:6], [True], "b", [0.7]),
    ]
    fig = ranked_lists(rows)
    assert len(fig.axes) == 2 * 4
    grid = np.array(fig.axes).reshape(2, 4)
    green, red = to_rgba("tab:green"), to_rgba("tab:red")
    assert [_frame_colours(ax) for ax in grid[0][1:]] == [{red}, {green}, {red}]
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["a", "b"]
    assert _frame_colours(grid[1][1]) == {green} and grid[1][1].get_title() == "1: 0.70"
    for ax in grid[1][2:]:  # nothing to show past the second row's single gallery image
        assert not ax.images and not ax.axison
    plt.close(fig)


# --------------------------------------------------------------------------- ap_histogram


@pytest.mark.parametrize("bins", [5, 20])
def test_ap_histogram_counts_every_query(bins):
    values = np.concatenate([[1.0, 1.0], np.random.default_rng(bins).uniform(0.2, 0.9, 40)])
    fig = ap_histogram(values, bins=bins)
    bars = fig.axes[0].patches
    assert len(bars) == bins
    assert sum(bar.get_height() for bar in bars) == len(values)
    assert bars[-1].get_height() >= 2  # AP 1.0 falls in the last bin
    # the bins always span 0..1, whatever the values, so histograms of two models compare
    assert bars[0].get_x() == pytest.approx(0.0)
    assert bars[-1].get_x() + bars[-1].get_width() == pytest.approx(1.0)
    assert bars[0].get_height() == 0
    plt.close(fig)


def test_the_query_browser_is_a_slider_with_the_picture_as_a_fallback(monkeypatch):
    from reid_utils.visualize import QueryBrowser

    drawn = []

    def draw(query):
        drawn.append(query)
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.set_title(f"query {query}")
        return fig

    browser = QueryBrowser(draw, 7, start=2)
    bundle = browser._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # JupyterLab shows the slider
    png = base64.b64decode(bundle["image/png"])  # static pages and nbval show the picture
    assert png.startswith(b"\x89PNG") and bundle["text/plain"].endswith("showing query 2 (move the slider in Jupyter)")
    assert (browser.slider.min, browser.slider.max, browser.slider.value) == (0, 6, 2)
    browser.slider.value = 5  # what a learner does
    assert drawn == [2, 5] and browser.query == 5 and browser.image.value != png
    assert base64.b64decode(browser._repr_mimebundle_()["image/png"]) == browser.image.value
    browser.show(1)
    assert browser.slider.value == 1 and drawn == [2, 5, 1]
    with pytest.raises(ValueError, match="between 0 and 6"):
        browser.show(7)
    assert not plt.get_fignums()  # every figure closed: nothing else appears in the notebook

    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ipywidgets"
                        else real_import(name, *a, **k))  # fmt: skip
    plain = QueryBrowser(draw, 3)  # no ipywidgets: the picture alone
    assert set(plain._repr_mimebundle_()) == {"text/plain", "image/png"}
    plain.show(2)
    assert plain.query == 2
