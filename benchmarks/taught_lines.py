"""How much of ``reid_utils`` a student reads to follow the series: ``python benchmarks/taught_lines.py``.

Counts the lines of the package code the notebooks print in full (``inspect.getsource``), of the stage modules
the notebooks teach from, and of the rest (the fast paths, the synthetic generator, the classroom tooling).
README.md quotes the figures; ``tests/test_project.py`` checks the quote against this count.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "prepare", "model", "train", "runs", "profiles", "test", "metrics", "rerank", "visualize", "losses",
          "samplers")  # fmt: skip


def shown() -> dict[str, int]:
    """Each package object a notebook prints with ``inspect.getsource``, and its length in lines."""
    printed = re.compile(r"getsource\((?:reid_utils\.\w+\.)?(\w+)\)")  # train_one_phase, reid_utils.train.train_model
    names = sorted({name for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
                    for name in printed.findall(path.read_text(encoding="utf-8"))})  # fmt: skip
    paths = sorted((ROOT / "reid_utils").glob("*.py"))
    modules = [importlib.import_module(f"reid_utils.{path.stem}") for path in paths]
    found = {}
    for name in names:
        (obj,) = {getattr(module, name) for module in modules if hasattr(module, name)}
        found[name] = len(inspect.getsource(obj).splitlines())
    return found


def module_lines(names) -> int:
    return sum(len((ROOT / "reid_utils" / f"{name}.py").read_text(encoding="utf-8").splitlines()) for name in names)


def counts() -> dict[str, int]:
    every = [path.stem for path in (ROOT / "reid_utils").glob("*.py")]
    return {
        "shown": sum(shown().values()),
        "stages": module_lines(STAGES),
        "rest": module_lines([name for name in every if name not in STAGES]),
    }


if __name__ == "__main__":
    for name, lines in shown().items():
        print(f"{name:<20} {lines:>4} lines")
    figures = counts()
    print(
        f"shown in the notebooks: {figures['shown']} lines; the stage modules: {figures['stages']}; "
        f"the rest: {figures['rest']}"
    )
