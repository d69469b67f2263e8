"""Run the whole notebook series headless: ``python -m reid_utils.series``.

Executes ``notebooks/NN_*.ipynb`` in order, each in a fresh kernel started in ``notebooks/``,
and writes the executed copies (and HTML pages with ``--html``) to ``build/`` (git-ignored).
``--profile NAME`` runs the series under another training profile (it is written into each notebook's
parameters cell), ``--timeout`` limits each cell. A notebook that fails is reported in one line and
saved, as far as it ran, to ``build/failed/``; the others still run, and a table at the end gives
every notebook's outcome. ``--inplace`` refreshes the committed notebooks instead, in the same
environment the tests use (synthetic data, no weight downloads), so their outputs match what
``pytest --nbval`` sees.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from reid_utils.files import atomic_write, write_problem

# What the tests run under (conftest.py calls this too): the same outputs on every machine.
# The committed outputs were computed with two threads (the CI machine's cores); a machine with more cores
# computes the same numbers only with the same thread count (how a sum is split between threads).
TEST_ENVIRONMENT = {"REID_OFFLINE": "1", "REID_DATASET": "synthetic", "OMP_NUM_THREADS": "2"}
PARAMETERS_TAG = "parameters"
KERNEL_NAME = "python3"  # ipykernel's kernel, the one every notebook names
INJECTED_TAG = "injected-parameters"


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


def inject_profile(notebook, profile: str) -> bool:
    """Put ``PROFILE = "<profile>"`` in a cell right after the notebook's parameters cell (as papermill does).

    Returns whether the notebook has a parameters cell (01 and 02 train nothing and have none).
    """
    import nbformat

    for index, cell in enumerate(notebook.cells):
        if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            injected = nbformat.v4.new_code_cell(
                f"PROFILE = {profile!r}  # injected by python -m reid_utils.series --profile",
                metadata={"tags": [INJECTED_TAG]},
            )
            notebook.cells.insert(index + 1, injected)
            return True
    return False


def execute(path: Path, timeout: int | None = None, profile: str | None = None):
    """Run one notebook top to bottom in a fresh kernel; returns the executed notebook.

    Raises nbclient's errors; the notebook they carry (``notebook`` attribute set here) holds the outputs
    up to the failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if profile is not None:
        inject_profile(notebook, profile)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        record_timing=False,  # no timestamps in cell metadata: re-runs leave clean diffs
        resources={"metadata": {"path": str(path.parent)}},
        config=kernel_manager_config(),
    )
    try:
        client.execute()
    except Exception as err:
        err.notebook = notebook
        raise
    show_progress_bars_as_they_ended(notebook)
    keep_static_pictures(notebook)
    notebook.metadata["kernelspec"] = installed_kernelspec()
    return notebook


def kernel_manager_config():
    """Encrypt the runner's connection to its kernels, where jupyter_client can: then ipykernel (7.4 and later)
    has nothing to warn about on stderr ("Kernel is running over TCP without encryption", once per notebook).

    jupyter_client 8.10 and later give the kernel CurveZMQ keys when its kernelspec says it supports them
    (``transport_encryption="auto"``); older versions have no such setting, and their kernels do not warn.
    A pyzmq built without CurveZMQ would refuse the setting: the kernel then runs as before.
    """
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    if "transport_encryption" not in KernelManager.class_trait_names() or not zmq.has("curve"):
        return Config()
    return Config({"KernelManager": {"transport_encryption": "auto"}})


def installed_kernelspec() -> dict:
    """The notebook metadata JupyterLab writes for the Python kernel installed here (``{name, display_name,
    language}``): with the same in the saved notebooks, opening one changes nothing, so no "save changes?"
    prompt and no ``git pull`` conflict for a file a student only read."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    return {"display_name": spec.display_name, "language": spec.language, "name": KERNEL_NAME}


def keep_static_pictures(notebook) -> None:
    """Outputs of widgets keep only their static copy: the picture or text a reader sees without a live kernel.

    A widget's output is a reference to a model in the kernel, next to a static copy (the query browser's PNG,
    the progress bar's last line). JupyterLab shows the reference first, and once the kernel has restarted the
    model is gone: "Error displaying widget: model not found". So a saved notebook keeps the static copy, and
    the widget state saved beside it goes (a live run draws its widgets again).
    """
    view = "application/vnd.jupyter.widget-view+json"
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if view in data and set(data) - {view}:
                del data[view]
    if not any(view in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", [])):
        notebook.metadata.pop("widgets", None)


def failure_line(path: Path, notebook, err: Exception, timeout: int | None) -> str:
    """One line: which notebook, which cell, what went wrong."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    failed = [
        i
        for i, cell in enumerate(notebook.cells)
        if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    ]
    cell_number = failed[0] if failed else None
    where = f"{path.name}, cell {cell_number}" if cell_number is not None else path.name
    if isinstance(err, CellTimeoutError):
        return f"{path.name}: a cell ran longer than --timeout {timeout} seconds (raise it, or leave it out)"
    if isinstance(err, DeadKernelError):
        return f"{path.name}: the kernel died (out of memory?)"
    if cell_number is not None:
        error = next(o for o in notebook.cells[cell_number].outputs if o.get("output_type") == "error")
        message = " ".join(_plain(error.get("evalue", "")).split())
        return f"{where}: {error.get('ename', 'Error')}: {message}"
    return f"{where}: {type(err).__name__}: {' '.join(_plain(str(err)).split())[:300]}"


def _plain(text: str) -> str:
    """Text without the colour codes a traceback carries."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def show_progress_bars_as_they_ended(notebook) -> None:
    """Make the plain-text copy of each progress bar show its final state, not the empty bar it started as.

    A tqdm bar in Jupyter is a widget; viewers without widgets (GitHub, plain text, a failed widget load)
    show the text captured when the bar was created ("0/9100"). The widget state saved in the notebook
    has the end: "100% 9100/9100 [...]".
    """
    states = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = states.get("state", {})
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            box = models.get(view["model_id"], {}) if view else {}
            children = [ref.removeprefix("IPY_MODEL_") for ref in box.get("state", {}).get("children", [])]
            parts = [models.get(child, {}).get("state", {}) for child in children]
            if len(parts) != 3 or "max" not in parts[1]:
                continue
            left, bar, right = parts
            filled = round(10 * bar.get("value", 0) / bar["max"]) if bar["max"] else 0
            text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
            output["data"]["text/plain"] = html.unescape(text).replace("\u2007", " ")


def export_html(notebook, target: Path) -> None:
    """One static page per notebook, outputs included, for students without Jupyter."""
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter().from_notebook_node(notebook)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")


def write_index(paths: list[Path], target: Path) -> None:
    """A contents page linking the notebook pages, titled with each notebook's first heading."""
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


def environment_problem() -> str | None:
    """A setting that would make every notebook fail the same way, found before any of them runs."""
    from reid_utils.data import MARKET_ENV_VAR, is_market_folder

    given = os.environ.get(MARKET_ENV_VAR)
    if given and os.environ.get("REID_DATASET") != "synthetic" and not is_market_folder(Path(given).expanduser()):
        return (
            f"${MARKET_ENV_VAR}={given} is not a Market-1501 folder (it needs bounding_box_train/, "
            f"bounding_box_test/ and query/): point it to the unzipped Market-1501-v15.09.15, or unset it."
        )
    return None


def main(argv: list[str] | None = None) -> int:
    from reid_utils.data import repo_root  # here, not above: the tests' setup imports this module
    from reid_utils.profiles import PROFILES

    parser = argparse.ArgumentParser(prog="python -m reid_utils.series", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build", help="where executed notebooks go (default build/)")
    parser.add_argument("--inplace", action="store_true", help="overwrite notebooks/ with executed copies")
    parser.add_argument("--html", action="store_true", help="also export each executed notebook as HTML")
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. --only 01 03")
    parser.add_argument("--notebooks", type=Path, help="run the notebooks of this folder (e.g. build/student)")
    parser.add_argument("--profile", choices=list(PROFILES), help="the training profile of notebooks 03-06")
    parser.add_argument("--timeout", type=int, default=None, help="seconds a cell may run (default: no limit)")
    parser.add_argument(
        "--no_execute", action="store_true", help="use the committed outputs as they are (with --html: fast export)"
    )
    args = parser.parse_args(argv)

    folder = args.notebooks or repo_root() / "notebooks"
    paths = notebook_paths(folder, args.only)
    problem = None
    if not paths:
        problem = f"no notebooks match in {folder}."
    elif args.inplace and args.no_execute:
        problem = "--inplace and --no_execute together would change nothing."
    elif args.inplace and args.profile:
        problem = "--inplace keeps the committed outputs of the default profile; run --profile without --inplace."
    elif args.timeout is not None and args.timeout < 1:
        problem = f"--timeout must be at least 1 second, got {args.timeout}."
    if args.inplace:
        use_test_environment()
    problem = problem or (None if args.no_execute else environment_problem())
    if problem:
        print(f"series: error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    outcomes: list[tuple[Path, float, str]] = []
    try:
        run_all(paths, out, args, outcomes)
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        done = f"; the {len(outcomes)} notebooks before it were written" if outcomes else ""
        print(f"\nseries: interrupted{done}. Run the same command again.", file=sys.stderr)
        return 130
    except OSError as err:
        problem = write_problem(err)
        if problem is None:
            raise
        print(f"series: error: {problem}. Free some space or choose another --out.", file=sys.stderr)
        return 2
    print()
    for path, seconds, outcome in outcomes:
        print(f"{path.name:<40} {seconds:6.1f} s  {outcome}")
    print(f"{'all notebooks':<40} {sum(s for _, s, _ in outcomes):6.1f} s")
    if args.html:
        write_index(paths, out / "html" / "index.html")
        print(f"HTML pages: {out / 'html' / 'index.html'}")
    failures = sum(outcome == "FAILED" for _, _, outcome in outcomes)
    if failures:
        print(f"series: {failures} of {len(outcomes)} notebooks failed (see the lines above).", file=sys.stderr)
        return 2
    return 0


def run_all(paths: list[Path], out: Path, args: argparse.Namespace, outcomes: list) -> None:
    """Execute (or read) each notebook and write it out, appending ``(path, seconds, outcome)`` to ``outcomes``.

    Each notebook is written through a temporary file: ``--inplace`` rewrites the committed notebooks, and a
    Ctrl-C or a full disk in the middle of one must not leave it cut short.
    """
    import nbformat

    from reid_utils.data import display_path

    for path in paths:
        started = time.perf_counter()
        try:
            if args.no_execute:
                notebook = nbformat.read(path, as_version=4)
            else:
                notebook = execute(path, args.timeout, args.profile)
        except Exception as err:  # a failing notebook: say where in one line, keep it, go on with the next
            notebook = getattr(err, "notebook", None)
            if notebook is None:
                raise
            failed = out / "failed" / path.name
            failed.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(failed, partial(nbformat.write, notebook))
            line = failure_line(path, notebook, err, args.timeout)
            print(f"series: error: {line} (the notebook as far as it ran: {display_path(failed)})", file=sys.stderr)
            outcomes.append((path, time.perf_counter() - started, "FAILED"))
            continue
        seconds = time.perf_counter() - started
        target = path if args.inplace else out / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, partial(nbformat.write, notebook))
        if args.html:
            export_html(notebook, out / "html" / path.with_suffix(".html").name)
        outcomes.append((path, seconds, f"ok -> {display_path(target)}"))


if __name__ == "__main__":
    raise SystemExit(main())
