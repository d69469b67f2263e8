"""The classroom layer: notebook exercises, their checkers, and the student copy without the solutions.

Each checker must accept the solution committed in its notebook (read from the ``solution``-tagged cell, so this
also proves the notebook holds a working one), reject the typical wrong answers with a hint that names the
problem, and turn every learner error into one ``✗ not yet:`` line. ``python -m reid_utils.student`` must strip
the solutions, clear the outputs, and leave notebooks that still run.
"""

import ast
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from reid_utils import exercises
from reid_utils.exercises import NOT_YET, STILL_A_STUB
from reid_utils.series import execute, notebook_paths
from reid_utils.student import MARKER, SOLUTION_TAG, main, stub_source

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# function the learner writes -> (its notebook's prefix, its checker); 03 has two, the phase and the epoch loop
EXERCISES = {
    "parse_name": ("01", exercises.check_parse_name),
    "classblock_parameters": ("02", exercises.check_classblock_parameters),
    "run_phase": ("03", exercises.check_run_phase),
    "train_model": ("03", exercises.check_train_model),
    "average_precision": ("04", exercises.check_average_precision),
    "k_reciprocal": ("05", exercises.check_k_reciprocal),
    "smoothed_target": ("06", exercises.check_smoothed_target),
}
CHECKERS = {name: check for name, (_, check) in EXERCISES.items()}
CASES = {
    "parse_name": exercises.PARSE_NAME_CASES,
    "classblock_parameters": exercises.CLASSBLOCK_CASES,
    "run_phase": exercises.RUN_PHASE_SEEDS,
    "train_model": exercises.TRAIN_MODEL_SEEDS,
    "average_precision": exercises.AVERAGE_PRECISION_CASES,
    "k_reciprocal": exercises.K_RECIPROCAL_CASES,
    "smoothed_target": exercises.SMOOTHED_TARGET_CASES,
}
PASSED_LINES = {name: f"✓ {name}: all {len(cases)} cases pass" for name, cases in CASES.items()}
PASSED_LINES["train_model"] = "✓ train_model: the same 3 epochs, checkpoints and redraws as the package's train()"


def notebook(prefix: str, folder: Path = NOTEBOOKS):
    (path,) = folder.glob(f"{prefix}_*.ipynb")
    return nbformat.read(path, as_version=4)


def solution_cells(nb) -> list:
    return [cell for cell in nb.cells if SOLUTION_TAG in cell.metadata.get("tags", [])]


def solution_cell(nb, name: str):
    """The one solution cell that defines ``name``."""
    (cell,) = [cell for cell in solution_cells(nb) if re.search(rf"^def {name}\(", cell.source, re.MULTILINE)]
    return cell


def load_solution(nb, name: str):
    """``name`` as the notebook defines it, the solution cells above its own run first in the same namespace
    (03's train_model calls the run_phase written before it)."""
    namespace: dict = {}
    for cell in solution_cells(nb):
        exec(compile(cell.source, f"<{name}>", "exec"), namespace)
        if cell is solution_cell(nb, name):
            return namespace[name]
    raise AssertionError(f"no solution cell defines {name}")


def load(source: str, name: str):
    """Run a cell's source in a fresh namespace and return the function it defines."""
    namespace: dict = {}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace[name]


def one_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), f"a checker prints exactly one line, got {out!r}"
    return out.rstrip("\n")


# --------------------------------------------------------------------------- the notebooks hold the exercises


def printed(cell) -> str:
    """All a cell printed, as one string: a busy kernel may send one print in several chunks."""
    assert all(o.output_type == "stream" and o.name == "stdout" for o in cell.outputs), cell.outputs
    return "".join(o.text for o in cell.outputs)


@pytest.mark.parametrize("name", EXERCISES)
def test_exercise_is_task_solution_check_before_the_quick_questions(name):
    prefix, check = EXERCISES[name]
    nb = notebook(prefix)
    solution = solution_cell(nb, name)
    at = nb.cells.index(solution)
    task, checker, after = nb.cells[at - 1], nb.cells[at + 1], nb.cells[at + 2]
    assert task.cell_type == "markdown" and task.source.startswith("## Exercise") and f"`{name}(" in task.source
    assert checker.cell_type == "code" and f"{check.__name__}({name})" in checker.source
    assert after.cell_type == "markdown"  # what follows: the quick questions, or (03) the rest of the loop
    assert any(cell.source.strip() == "## Quick questions" for cell in nb.cells[at + 2 :])
    assert printed(checker) == PASSED_LINES[name] + "\n"


def test_every_solution_cell_is_an_exercise():
    for prefix in sorted({prefix for prefix, _ in EXERCISES.values()}):
        names = [name for name, (other, _) in EXERCISES.items() if other == prefix]
        assert [solution_cell(notebook(prefix), name) for name in names] == solution_cells(notebook(prefix))


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_accepts_the_solution_committed_in_the_notebook(name, capsys):
    prefix, check = EXERCISES[name]
    assert check(load_solution(notebook(prefix), name)) is True
    assert one_line(capsys) == PASSED_LINES[name]


# --------------------------------------------------------------------------- typical mistakes get a named hint


def _parse_four_digit_pid(filename):
    match = re.fullmatch(r"(\d{4})_c(\d)s\d_\d{6}_\d{2}\.jpg", Path(filename).name)
    if match is None:
        raise ValueError(filename)
    return int(match[1]), int(match[2])


def _parse_whole_path(filename):
    parts = filename.split("_")
    return int(parts[0]), int(parts[1][1])


def _parse_without_check(filename):
    parts = Path(filename).name.split("_")
    return int(parts[0]), int(parts[1][1])


def _hits(is_match):
    return list(enumerate((r for r, match in enumerate(is_match) if match), start=1))


def _ap_step(is_match):
    hits = _hits(is_match)
    return sum(i / (r + 1) for i, r in hits) / len(hits)


def _ap_not_divided(is_match):
    return sum((((i - 1) / r if r else 1.0) + i / (r + 1)) / 2 for i, r in _hits(is_match))


def _ap_one_based(is_match):
    hits = [(i, r + 1) for i, r in _hits(is_match)]  # 1-based positions in the 0-based formulas
    return sum(((i - 1) / r + i / (r + 1)) / 2 for i, r in hits) / len(hits)


def _ap_no_special_case(is_match):
    hits = _hits(is_match)
    return sum(((i - 1) / r + i / (r + 1)) / 2 for i, r in hits) / len(hits)


def _phase_with(model, loader, phase, criterion, optimizer, device, y_loss, y_err, *, skip=True, switch=True,
                zero_grad=True, val_step=False, divide_by_all=False, error=True, skip_val=False):  # fmt: skip
    """A learner's run_phase with one of the typical mistakes, written as a learner would."""
    if switch:
        model.train(phase == "train")
    running_loss, running_corrects, seen = 0.0, 0, 0
    for inputs, labels in loader:
        if skip and (phase == "train" or skip_val) and inputs.size(0) < loader.batch_size:
            continue
        if phase == "train" and zero_grad:
            optimizer.zero_grad()
        with torch.set_grad_enabled(phase == "train" or val_step):
            outputs = model(inputs.to(device))
            _, preds = torch.max(outputs, 1)
            loss = criterion(outputs, labels)
        if phase == "train" or val_step:
            loss.backward()
            optimizer.step()
        running_loss += loss.item() * inputs.size(0)
        running_corrects += int((preds == labels).sum())
        seen += inputs.size(0)
    images = sum(len(labels) for _, labels in loader) if divide_by_all else seen
    epoch_loss, epoch_acc = running_loss / images, running_corrects / images
    y_loss[phase].append(epoch_loss)
    y_err[phase].append(1.0 - epoch_acc if error else epoch_acc)
    return epoch_loss, epoch_acc


def _blog_phase(model, loader, phase, criterion, optimizer, device, y_loss, y_err):
    """A faithful copy of the blog's loop (layumi's tutorial): the short batch skipped in both phases, the sums
    divided by the dataset's size."""
    model.train(phase == "train")
    running_loss, running_corrects = 0.0, 0.0
    for inputs, labels in loader:
        now_batch_size = inputs.shape[0]
        if now_batch_size < loader.batch_size:  # skip the last batch
            continue
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        if phase == "val":
            with torch.no_grad():
                outputs = model(inputs)
        else:
            outputs = model(inputs)
        _, preds = torch.max(outputs.data, 1)
        loss = criterion(outputs, labels)
        if phase == "train":
            loss.backward()
            optimizer.step()
        running_loss += loss.item() * now_batch_size
        running_corrects += float(torch.sum(preds == labels.data))
    epoch_loss = running_loss / len(loader.dataset)
    epoch_acc = running_corrects / len(loader.dataset)
    y_loss[phase].append(epoch_loss)
    y_err[phase].append(1.0 - epoch_acc)
    return epoch_loss, epoch_acc


def _train_model_with(model, loaders, criterion, optimizer, scheduler, device, num_epochs, save_network, draw_curve,
                      save_every=10, *, phase=_phase_with, scheduler_first=False, set_epoch=True, zero_based=False,
                      draw_each_epoch=True, last=True):  # fmt: skip
    """A learner's train_model with one of the typical mistakes (or the blog's ways), written as a learner would."""
    y_loss, y_err = {"train": [], "val": []}, {"train": [], "val": []}
    for epoch in range(num_epochs):
        if set_epoch:
            loaders["train"].sampler.set_epoch(epoch)
        for name in ("train", "val"):
            if scheduler_first and name == "train":
                scheduler.step()
            phase(model, loaders[name], name, criterion, optimizer, device, y_loss, y_err)
        if not scheduler_first:
            scheduler.step()
        saving = epoch % save_every == save_every - 1
        if saving:
            save_network(model, epoch if zero_based else epoch + 1)
        if draw_each_epoch or saving:
            draw_curve(y_loss, y_err)
    if last:
        save_network(model, "last")
    return y_loss, y_err


def _nearest(dist, row, k):
    return {int(j) for j in np.argsort(dist[row], kind="stable")[:k]}


def _nearest_only(dist, i, k):
    return _nearest(dist, i, k)


WRONG_ANSWERS = [
    # (checker, plausible wrong answer, what the hint must say)
    ("parse_name", _parse_four_digit_pid, "junk boxes have the pid -1"),
    ("parse_name", _parse_whole_path, "without its folders"),
    ("parse_name", _parse_without_check, "should raise ValueError"),
    ("parse_name", lambda f: tuple(Path(f).name.split("_")[0:2]), "convert the parts to int"),
    ("parse_name", lambda f: _parse_four_digit_pid(f)[::-1], "the order is (pid, camera)"),
    ("classblock_parameters", lambda i, n, c: i * n + n + 4 * n + n * c + c, "running_var are buffers"),
    ("classblock_parameters", lambda i, n, c: i * n + n + 4 * n + 1 + n * c + c, "num_batches_tracked are buffers"),
    ("classblock_parameters", lambda i, n, c: i * n + 2 * n + n * c, "both Linear layers have a bias"),
    ("classblock_parameters", lambda i, n, c: i * n + n + n * c + c, "BatchNorm1d has a weight and a bias"),
    ("classblock_parameters", lambda i, n, c: float(i * n + 3 * n + n * c + c), "a count is an int"),
    ("run_phase", lambda *args: _phase_with(*args, skip=False), "skip the short last training batch"),
    ("run_phase", lambda *args: _phase_with(*args, switch=False), "switch the mode first"),
    ("run_phase", lambda *args: _phase_with(*args, zero_grad=False), "call optimizer.zero_grad()"),
    ("run_phase", lambda *args: _phase_with(*args, val_step=True), "only the train phase calls loss.backward()"),
    ("run_phase", lambda *args: _phase_with(*args, divide_by_all=True), "divide the sums by the images actually used"),
    ("run_phase", lambda *args: _phase_with(*args, error=False), "should append"),
    ("run_phase", lambda *args: _phase_with(*args)[0], "should return (loss, accuracy)"),
    ("run_phase", _blog_phase, "that is the blog's loop, which skips the short last batch in val too"),
    ("run_phase", lambda *args: _phase_with(*args, skip_val=True), "that skips the short last batch in val too"),
    (
        "train_model",
        lambda *a, **k: _train_model_with(*a, **k, phase=_blog_phase, scheduler_first=True),
        "that is the blog's loop as train.py wrote it then",
    ),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k, scheduler_first=True), "the rate drops one epoch early"),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k, set_epoch=False), "sampler.set_epoch(epoch)"),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k, zero_based=True), "calls it net_9.pth"),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k, last=False), 'save_network(model, "last")'),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k, draw_each_epoch=False), "as layumi's train.py does"),
    ("train_model", lambda *a, **k: _train_model_with(*a, **k)[0], "should return (y_loss, y_err)"),
    ("average_precision", _ap_step, "that is the step AP"),
    ("average_precision", _ap_not_divided, "did not divide by the number of hits"),
    ("average_precision", _ap_one_based, "off by one in the rank"),
    ("average_precision", _ap_no_special_case, "ZeroDivisionError"),
    ("k_reciprocal", lambda d, i, k: {j for j in _nearest(d, i, k) if i in _nearest(d, j, k)} - {i}, "i itself"),
    ("k_reciprocal", lambda d, i, k: _nearest_only(d, i, k), "keep only those that also have i among their k nearest"),
    ("k_reciprocal", lambda d, i, k: {j for j in _nearest(d, i, k + 1) if i in _nearest(d, j, k + 1)}, "k + 1"),
    ("k_reciprocal", lambda d, i, k: sorted(j for j in _nearest(d, i, k) if i in _nearest(d, j, k)), "the set"),
    ("smoothed_target", lambda c, t, e: [1 - e if i == t else e / (c - 1) for i in range(c)], "over *all* classes"),
    ("smoothed_target", lambda c, t, e: [1.0 - e if i == t else e / c for i in range(c)], "sum to 1"),
    ("smoothed_target", lambda c, t, e: [1.0 * (i == t) for i in range(c - 1)], "one per class"),
]


@pytest.mark.parametrize(("name", "wrong", "hint"), WRONG_ANSWERS, ids=[f"{n}-{h[:30]}" for n, _, h in WRONG_ANSWERS])
def test_checker_rejects_a_typical_mistake_and_names_it(name, wrong, hint, capsys):
    assert CHECKERS[name](wrong) is False
    line = one_line(capsys)
    assert line.startswith(f"{NOT_YET} {name}("), line  # names the failing call ...
    assert "should" in line and hint in line, line  # ... what was expected, and the mistake


def _raises_key_error(*args):
    return {}["missing"]


@pytest.mark.parametrize("name", CHECKERS)
def test_learner_errors_become_one_line_never_a_traceback(name, capsys):
    check = CHECKERS[name]

    def stub(*args):
        raise NotImplementedError

    assert check(stub) is False
    assert one_line(capsys) == STILL_A_STUB
    assert check(_raises_key_error) is False
    line = one_line(capsys)
    assert line.startswith(f"{NOT_YET} {name}(") and "raised KeyError: 'missing'" in line
    assert check(lambda *args: None) is False
    line = one_line(capsys)
    assert line.startswith(f"{NOT_YET} {name}(") and line.endswith("None") or "got None" in line, line
    assert check(name) is False  # the name instead of the function
    assert one_line(capsys) == f"{NOT_YET} pass the function itself, e.g. check_{name}({name}), not str {name!r}"


def test_checkers_leave_the_random_state_alone_and_print_the_same_line_twice(capsys):
    solution = load(solution_cells(notebook("02"))[0].source, "classblock_parameters")
    state = torch.random.get_rng_state()
    wrong = _nearest_only  # a wrong answer, so the hint's path runs too
    lines = []
    for _ in range(2):
        exercises.check_classblock_parameters(solution)
        exercises.check_k_reciprocal(wrong)
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1]
    assert torch.equal(torch.random.get_rng_state(), state)


# --------------------------------------------------------------------------- the checkers' truths


def test_the_loop_checker_takes_its_truth_from_the_training_loop(monkeypatch, capsys):
    """check_run_phase compares with reid_utils.train.train_one_phase itself: change the loop and the
    learner's correct answer no longer matches."""
    import reid_utils.train as train_module

    solution = load(solution_cells(notebook("03"))[0].source, "run_phase")
    assert exercises.check_run_phase(solution) is True
    real = train_module.train_one_phase

    def never_skips(model, loader, phase, *rest):
        class All(list):
            batch_size = 0  # no batch is shorter than this: nothing skipped

        return real(model, All(loader), phase, *rest)

    monkeypatch.setattr(train_module, "train_one_phase", never_skips)
    capsys.readouterr()
    assert exercises.check_run_phase(solution) is False
    assert "phase='train'" in one_line(capsys)


def test_the_epoch_loop_checker_takes_its_truth_from_train_itself(monkeypatch):
    """check_train_model compares with a short run of reid_utils.train.train: change the package's loop and the
    learner's correct answer no longer matches (the learner's own run_phase is left as it was)."""
    import reid_utils.train as train_module

    solution = load_solution(notebook("03"), "train_model")
    real = train_module.train_one_phase

    def never_skips(model, loader, phase, *rest):
        class All(list):
            batch_size = 0  # no batch is shorter than this: nothing skipped

        return real(model, All(loader), phase, *rest)

    learner = exercises._loop_run(solution, 0)
    assert exercises._same_history(learner, exercises._package_run(0)) is None
    monkeypatch.setattr(train_module, "train_one_phase", never_skips)
    exercises._package_run.cache_clear()
    try:
        assert "as train() does" in exercises._same_history(learner, exercises._package_run(0))
    finally:
        exercises._package_run.cache_clear()  # the next checker call trains the real package loop again


def test_the_epoch_loop_checker_leaves_the_random_state_alone_and_writes_nothing_it_keeps(tmp_path, monkeypatch):
    import random

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the checker's short runs write
    solution = load_solution(notebook("03"), "train_model")
    states = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert exercises.check_train_model(solution) is True
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("is_match", exercises.AVERAGE_PRECISION_CASES)
def test_average_precision_cases_rank_exactly_as_given(is_match):
    from reid_utils.metrics import rank_gallery

    case = exercises.ranking_case(is_match)
    assert (case["gallery_pids"] == -1).any() and ((case["gallery_pids"] == 7) & (case["gallery_cams"] == 1)).any()
    ranked = rank_gallery(case["query_features"][0], 7, 1, *(case[k] for k in ("gallery_features", "gallery_pids",
                                                                              "gallery_cams")))  # fmt: skip
    assert ranked.is_match.tolist() == list(is_match)


def test_k_reciprocal_matrices_are_distance_matrices_and_the_cases_tell_mistakes_apart():
    forward_differs = False
    for kind, n, i, k in exercises.K_RECIPROCAL_CASES:
        dist = exercises.distance_matrix(kind, n)
        assert dist.shape == (n, n) and np.array_equal(dist, dist.T) and not np.diag(dist).any()
        assert (dist[~np.eye(n, dtype=bool)] > 0).all()
        assert i in exercises.reference_k_reciprocal(dist, i, k)
        forward_differs |= exercises.reference_k_reciprocal(dist, i, k) != _nearest(dist, i, k)
    assert forward_differs
    ties = exercises.distance_matrix("ties", 9)
    assert len(np.unique(ties)) == 4  # 0, 1, 2, 3: the stable order matters


# --------------------------------------------------------------------------- the student copy


def test_stub_keeps_imports_headers_and_docstrings_only():
    source = '''import re
from pathlib import Path

PATTERN = re.compile("x")


@staticmethod
def f(
    a: int,
    b: str = ":",
) -> int:  # a comment
    """Doc: with a colon."""
    # a hint that belongs to the solution
    return a


def g(x): return x
'''
    expected = '''import re
from pathlib import Path


@staticmethod
def f(
    a: int,
    b: str = ":",
) -> int:
    """Doc: with a colon."""
    # your code here
    raise NotImplementedError


def g(x):
    # your code here
    raise NotImplementedError'''
    assert stub_source(source) == expected
    assert stub_source("x = 1") == "# your code here\nraise NotImplementedError"


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "copy"
    assert main(["--out", str(out)]) == 0
    return out


def test_student_copy_has_every_notebook_with_solutions_stubbed_and_outputs_cleared(student_copy):
    originals = notebook_paths(NOTEBOOKS)
    assert sorted(p.name for p in student_copy.iterdir()) == sorted([p.name for p in originals] + [MARKER])
    for path in originals:
        original = nbformat.read(path, as_version=4)
        copy = nbformat.read(student_copy / path.name, as_version=4)
        nbformat.validate(copy)
        assert "widgets" not in copy.metadata
        for before, after in zip(original.cells, copy.cells, strict=True):
            assert "execution" not in after.metadata
            if after.cell_type == "code":
                assert after.outputs == [] and after.execution_count is None, path.name
            if SOLUTION_TAG not in before.metadata.get("tags", []):
                assert after.source == before.source
                continue
            defs = {n.name: n for n in ast.parse(before.source).body if isinstance(n, ast.FunctionDef)}
            stubs = {n.name: n for n in ast.parse(after.source).body if isinstance(n, ast.FunctionDef)}
            assert defs.keys() == stubs.keys() and defs
            for name, stub in stubs.items():
                assert ast.get_docstring(stub) == ast.get_docstring(defs[name]) and ast.get_docstring(stub)
                assert ast.dump(stub.args) == ast.dump(defs[name].args)
                assert isinstance(stub.body[-1], ast.Raise) and len(stub.body) == 2  # docstring, raise
            assert "# your code here" in after.source and "return" not in after.source


@pytest.mark.parametrize("name", EXERCISES)
def test_student_stubs_make_the_checker_say_write_the_body(student_copy, name, capsys):
    prefix, check = EXERCISES[name]
    assert check(load_solution(notebook(prefix, student_copy), name)) is False
    assert one_line(capsys) == STILL_A_STUB


def test_student_notebook_01_runs_top_to_bottom_and_says_not_yet(student_copy):
    executed = execute(next(student_copy.glob("01_*.ipynb")))  # as python -m reid_utils.series runs it
    (stub,) = solution_cells(executed)
    checker = executed.cells[executed.cells.index(stub) + 1]
    assert printed(checker) == STILL_A_STUB + "\n"
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_student_copy_replaces_an_earlier_copy_in_one_step(tmp_path, monkeypatch, capsys):
    import reid_utils.student as student

    out = tmp_path / "student"
    assert main(["--out", str(out)]) == 0
    (out / "99_stale.ipynb").write_text("{}")  # an earlier copy of this command's, with a notebook since removed
    assert main(["--out", str(out)]) == 0
    assert not (out / "99_stale.ipynb").exists() and (out / "01_data_preparation.ipynb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folders left
    assert "outputs cleared" in capsys.readouterr().out

    calls, original = [], student.student_notebook

    def fails_on_the_third(nb):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(nb)

    monkeypatch.setattr(student, "student_notebook", fails_on_the_third)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--out", str(out)])
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before  # the old copy, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    with pytest.raises(RuntimeError):
        calls.clear()
        main(["--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()  # never half written


def test_student_refuses_bad_output_folders(tmp_path, capsys):
    cases = {
        str(NOTEBOOKS): "would replace the notebooks",
        str(ROOT): "would replace the notebooks",
        str(NOTEBOOKS / "student"): "inside",
    }
    (tmp_path / "a_file").write_text("x")
    cases[str(tmp_path / "a_file")] = "is a file"
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    cases[str(tmp_path / "mixed")] = "was not made by python -m reid_utils.student"
    (tmp_path / "teacher").mkdir()  # a teacher's own notebooks: notebooks only, but not a copy this command made
    (tmp_path / "teacher" / "01_my_lesson.ipynb").write_text('{"mine": true}')
    cases[str(tmp_path / "teacher")] = "refusing to replace it"
    for out, message in cases.items():
        assert main(["--out", out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("student: error: --out") and message in err, err
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == ["01_my_lesson.ipynb"]
    assert (tmp_path / "teacher" / "01_my_lesson.ipynb").read_text() == '{"mine": true}'
    assert not (NOTEBOOKS / "student").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--bogus"])
    assert exit_info.value.code == 2


def test_student_command_line_exit_code(monkeypatch, capsys):
    # python -m reid_utils.student --out notebooks, run as __main__ in this process (no second Python start)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["student", "--out", "notebooks"])
    monkeypatch.delitem(sys.modules, "reid_utils.student", raising=False)
    with pytest.raises(SystemExit) as end:
        runpy.run_module("reid_utils.student", run_name="__main__")
    captured = capsys.readouterr()
    assert end.value.code == 2 and "would replace the notebooks" in captured.err and not captured.out


def test_my_files_are_lint_clean():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    files = ["reid_utils/exercises.py", "reid_utils/student.py", "tests/test_exercises.py"]
    for command in ([ruff, "check", *files], [ruff, "format", "--check", *files]):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
