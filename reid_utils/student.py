"""Make the student copy of the notebooks: ``python -m reid_utils.student [--out build/student]``.

Copies ``notebooks/NN_*.ipynb`` to the output folder with every exercise solution removed: a code cell tagged
``solution`` keeps its imports, ``def`` lines and docstrings, and its body becomes ``# your code here`` and
``raise NotImplementedError``, so the checker cell below it says "not yet" until the learner writes it. All
outputs and execution counts are cleared. An earlier copy in the output folder is replaced -- only one this
command made, recognised by its ``STUDENT_COPY.json``; any other folder that is not empty (a teacher's own
notebooks, say) is refused and left untouched. The copy is written to a temporary folder next to the output
folder and renamed into place at the end, so a half-written copy never exists.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from pathlib import Path

from reid_utils.data import display_path, repo_root
from reid_utils.files import atomic_folder, replace_problem, write_problem
from reid_utils.series import notebook_paths

SOLUTION_TAG = "solution"
MARKER = "STUDENT_COPY.json"  # in every copy: only a folder with it is ever replaced
STUB_BODY = ("# your code here", "raise NotImplementedError")


def _signature_end(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    """(line, column) just after the colon that ends the ``def`` header (1-based line)."""
    lines = source.splitlines(keepends=True)
    header = "".join(lines[node.lineno - 1 :])
    depth = 0
    for token in tokenize.generate_tokens(io.StringIO(header).readline):
        if token.type == tokenize.OP:
            if token.string in "([{":
                depth += 1
            elif token.string in ")]}":
                depth -= 1
            elif token.string == ":" and depth == 0:
                return node.lineno + token.end[0] - 1, token.end[1]
    raise ValueError(f"no end of the header of {node.name}()")  # cannot happen for code that parsed


def _stub_function(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    lines = source.splitlines()
    first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    end_line, end_column = _signature_end(source, node)
    header = lines[first - 1 : end_line]
    header[-1] = header[-1][:end_column]  # drops a body written on the header's own line
    statement = node.body[0]
    own_line = statement.lineno > end_line
    indent = " " * (statement.col_offset if own_line else node.col_offset + 4)
    docstring = ast.get_docstring(node, clean=False)
    if docstring is None:
        kept = []
    elif own_line:
        kept = lines[statement.lineno - 1 : statement.end_lineno]  # the docstring exactly as written
    else:
        kept = [indent + repr(docstring)]
    return "\n".join(header + kept + [indent + line for line in STUB_BODY])


def stub_source(source: str) -> str:
    """A solution cell as the student sees it: its imports, then each function's header and docstring.

    Every body becomes ``# your code here`` / ``raise NotImplementedError``. Other top-level statements
    (helpers, constants, calls) are part of the solution and dropped.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    imports, functions = [], []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.extend(lines[node.lineno - 1 : node.end_lineno])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions.append(_stub_function(source, node))
    blocks = (["\n".join(imports)] if imports else []) + functions
    stub = "\n\n\n".join(blocks) if blocks else "\n".join(STUB_BODY)
    ast.parse(stub)  # a broken stub would be a bug here, not the learner's
    return stub


def is_solution(cell) -> bool:
    return cell.get("cell_type") == "code" and SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_notebook(notebook):
    """A copy of ``notebook`` with solutions stubbed and every output, count and run timestamp cleared."""
    import copy

    notebook = copy.deepcopy(notebook)
    notebook.metadata.pop("widgets", None)  # widget state belongs to outputs that are gone
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type != "code":
            continue
        if is_solution(cell):
            cell.source = stub_source(cell.source)
        cell.outputs = []
        cell.execution_count = None
    return notebook


def _refusal(out: Path, source: Path) -> str | None:
    """Why writing (and replacing) ``out`` would be a mistake, or None."""
    if out == source or source.is_relative_to(out):
        return f"--out {out} would replace the notebooks in {source}; choose another folder, e.g. build/student"
    if out.is_relative_to(source):
        return f"--out {out} is inside {source}; the copies would mix with the originals. Use e.g. build/student"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    problem = replace_problem(out, True, (out / MARKER).is_file(), MARKER, "python -m reid_utils.student")
    return f"--out {problem.rstrip('.')}" if problem else None


def write_student_copy(paths: list[Path], out: Path) -> list[tuple[Path, int]]:
    """Write the student copies of ``paths`` into ``out`` (replacing it); returns (target, exercises) pairs."""
    import nbformat

    written = []
    with atomic_folder(out) as staging:
        for path in paths:
            notebook = nbformat.read(path, as_version=4)
            copy = student_notebook(notebook)
            nbformat.validate(copy)
            nbformat.write(copy, staging / path.name)
            written.append((out / path.name, sum(is_solution(cell) for cell in notebook.cells)))
        marker = {"made_by": "reid_utils.student", "notebooks": [path.name for path in paths]}
        (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_utils.student", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/student", help="where the student notebooks go (default build/student)")
    args = parser.parse_args(argv)

    source = repo_root() / "notebooks"
    paths = notebook_paths(source)
    if not paths:
        print(f"student: error: no NN_*.ipynb notebooks in {source}.", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    refusal = _refusal(out, source.resolve())
    if refusal:
        print(f"student: error: {refusal}.", file=sys.stderr)
        return 2
    try:
        written = write_student_copy(paths, out)
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        print(f"\nstudent: interrupted; {display_path(out)} is as it was before. Run the same command again.",
              file=sys.stderr)  # fmt: skip
        return 130
    except OSError as err:
        problem = write_problem(err)
        if problem is None:
            raise
        print(f"student: error: {problem}. Free some space or choose a writable --out.", file=sys.stderr)
        return 2
    for target, exercises in written:
        print(f"{target.name:<40} {exercises} exercise{'s' if exercises != 1 else ''} stubbed")
    print(f"student copy: {len(written)} notebooks in {display_path(out)}/, outputs cleared")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
