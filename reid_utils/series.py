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

# What the tests set (see tests/conftest.py): the same outputs on every machine.
TEST_ENVIRONMENT = {"REID_OFFLINE": "1", "REID_DATASET": "synthetic"}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_utils.series", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="where executed notebooks go (default build/)")
    parser.add_argument("--inplace", action="store_true", help="overwrite notebooks/ with executed copies")
    parser.add_argument("--html", action="store_true", help="also export each executed notebook as HTML")
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. --only 01 03")
    args = parser.parse_args(argv)

    import nbformat

    folder = repo_root() / "notebooks"
    paths = notebook_paths(folder, args.only)
    if not paths:
        print(f"series: error: no notebooks match in {folder}.", file=sys.stderr)
        return 2
    if args.inplace:
        os.environ.update(TEST_ENVIRONMENT)
        os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="torch-home-")  # an empty weight cache
    out = Path(args.out)
    total = 0.0
    for path in paths:
        started = time.perf_counter()
        notebook = execute(path)
        seconds = time.perf_counter() - started
        total += seconds
        target = path if args.inplace else out / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
        if args.html:
            from nbconvert import HTMLExporter

            html, _ = HTMLExporter().from_notebook_node(notebook)
            (out / "html").mkdir(parents=True, exist_ok=True)
            (out / "html" / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
        print(f"{path.name:<40} {seconds:6.1f} s -> {target}")
    print(f"{'all notebooks':<40} {total:6.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
