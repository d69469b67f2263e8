"""Run the whole notebook series headless: ``python -m reid_utils.series``.

Executes ``notebooks/NN_*.ipynb`` in order, each in a fresh kernel started in ``notebooks/``,
and writes the executed copies (and HTML pages with ``--html``) to ``build/`` (git-ignored).
``--inplace`` refreshes the committed notebooks instead, in the same environment the tests use
(synthetic data, no weight downloads), so their outputs match what ``pytest --nbval`` sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from reid_utils.data import repo_root

# What the tests run under (tests/conftest.py calls this too): the same outputs on every machine.
TEST_ENVIRONMENT = {"REID_OFFLINE": "1", "REID_DATASET": "synthetic"}


def use_test_environment() -> None:
    """Synthetic data, no weight downloads and an empty weight cache, for this process and its kernels."""
    os.environ.update(TEST_ENVIRONMENT)
    os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="reid-torch-home-")
    os.environ.pop("MARKET1501_DIR", None)


def notebook_paths(folder: Path, only: list[str] | None = None) -> list[Path]:
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in only)]
    return paths


def execute(path: Path, timeout: int = 900):
    """Run one notebook top to bottom in a fresh kernel; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps in cell metadata: re-runs leave clean diffs
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


def export_html(notebook, target: Path) -> None:
    """One static page per notebook, outputs included, for students without Jupyter."""
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_notebook_node(notebook)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(html, encoding="utf-8")


def write_index(paths: list[Path], target: Path) -> None:
    """A contents page linking the notebook pages, titled with each notebook's first heading."""
    import html

    import nbformat

    items = []
    for path in paths:
        first = nbformat.read(path, as_version=4).cells[0].source.splitlines()[0].lstrip("# ")
        items.append(f'<li><a href="{path.with_suffix(".html").name}">{html.escape(first)}</a></li>')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "<!doctype html><meta charset='utf-8'><title>Person re-ID in plain PyTorch</title>"
        "<h1>Person re-identification in plain PyTorch</h1><ol>" + "".join(items) + "</ol>",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_utils.series", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="where executed notebooks go (default build/)")
    parser.add_argument("--inplace", action="store_true", help="overwrite notebooks/ with executed copies")
    parser.add_argument("--html", action="store_true", help="also export each executed notebook as HTML")
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. --only 01 03")
    parser.add_argument(
        "--no_execute", action="store_true", help="use the committed outputs as they are (with --html: fast export)"
    )
    args = parser.parse_args(argv)

    import nbformat

    folder = repo_root() / "notebooks"
    paths = notebook_paths(folder, args.only)
    if not paths:
        print(f"series: error: no notebooks match in {folder}.", file=sys.stderr)
        return 2
    if args.inplace and args.no_execute:
        print("series: error: --inplace and --no_execute together would change nothing.", file=sys.stderr)
        return 2
    if args.inplace:
        use_test_environment()
    out = Path(args.out)
    total = 0.0
    for path in paths:
        started = time.perf_counter()
        notebook = nbformat.read(path, as_version=4) if args.no_execute else execute(path)
        seconds = time.perf_counter() - started
        total += seconds
        target = path if args.inplace else out / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
        if args.html:
            export_html(notebook, out / "html" / path.with_suffix(".html").name)
        print(f"{path.name:<40} {seconds:6.1f} s -> {target}")
    print(f"{'all notebooks':<40} {total:6.1f} s")
    if args.html:
        write_index(paths, out / "html" / "index.html")
        print(f"HTML pages: {out / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
