"""Bad input, interruption and re-running: each case a user can cause, answered by one clear message.

Every CLI error must exit with code 2, print one ``<tool>: error:`` line (no traceback) and leave nothing
half-written behind.
"""

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from reid_utils import prepare as prepare_cli
from reid_utils import test as test_cli
from reid_utils import train as train_cli
from reid_utils.model import select_device

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--backbone", "resnet18", "--height", "32", "--width", "16", "--batchsize", "16", "--no_pretrained"]


def error_line(capsys, tool: str) -> str:
    """The error, on its own last line of stderr (a progress bar may stand above it)."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith(f"{tool}: error:") and "Traceback" not in err, err
    return last


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture()
def prepared_copy(tiny_prepared, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, copy)
    return copy


@pytest.mark.parametrize("tool", [train_cli, test_cli])
def test_missing_data_dir_is_an_argument_error(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main([])
    assert exit_info.value.code == 2 and "--data_dir" in capsys.readouterr().err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_cli.main(["--data_dir", str(tmp_path / "empty"), "--model_dir", str(tmp_path), *FAST]) == 2
    assert "not a prepared folder" in error_line(capsys, "train")
    assert not (tmp_path / "ft_ResNet50").exists()


def suggested_prepare(line: str) -> list[str]:
    """The arguments of the `python -m reid_utils.prepare ...` command an error line suggests."""
    match = re.search(r"`python -m reid_utils\.prepare ([^`]+)`", line)
    assert match, line
    return match[1].split()


def test_raw_market_folder_where_a_prepared_one_is_expected(tiny_market, tmp_path, capsys):
    """The advice was `prepare --src <Market-1501 folder> --dst <the raw folder>`, and that command fails."""
    raw = tmp_path / "data" / "Market-1501"
    shutil.copytree(tiny_market, raw)
    args = ["--model_dir", str(tmp_path / "model"), *FAST, "--total_epoch", "1"]
    assert train_cli.main(["--data_dir", str(raw), *args]) == 2
    line = error_line(capsys, "train")
    assert prepare_cli.main(suggested_prepare(line)) == 0  # the advice, followed
    prepared = re.search(r"pass --data_dir (\S+)\.$", line)[1]
    assert train_cli.main(["--data_dir", prepared, *args]) == 0
    capsys.readouterr()
    assert test_cli.main(["--data_dir", str(raw), "--model_dir", str(tmp_path / "model"), "--gpu_ids", ""]) == 2
    assert suggested_prepare(error_line(capsys, "test")) == suggested_prepare(line)  # the same advice at test time


def test_advice_for_a_damaged_prepared_tree_rebuilds_it(tiny_market, tmp_path, capsys):
    """`run prepare again` printed "nothing to do" for a tree that had lost files: now prepare rebuilds it."""
    prepared = tmp_path / "prepared"
    prepare_cli.main(["--src", str(tiny_market), "--dst", str(prepared)])
    shutil.rmtree(next((prepared / "train").iterdir()))  # an identity's training images deleted by hand
    args = ["--data_dir", str(prepared), "--model_dir", str(tmp_path / "model"), *FAST, "--total_epoch", "1"]
    capsys.readouterr()
    assert train_cli.main(args) == 2
    assert prepare_cli.main(suggested_prepare(error_line(capsys, "train"))) == 0
    assert "building it again" in capsys.readouterr().out
    assert train_cli.main(args) == 0


def test_identities_with_a_single_training_image(tiny_market, tmp_path, capsys):
    """prepare put an identity's only image into val/, training said `train and val hold different identities; run
    prepare again`, and prepare again said "nothing to do". The only image now trains; val/ tests the others."""
    src = tmp_path / "Market"
    shutil.copytree(tiny_market, src)
    first = sorted((src / "bounding_box_train").glob("*.jpg"))
    for image in first[1:]:
        if image.name[:4] == first[0].name[:4]:
            image.unlink()  # the first identity keeps a single image
    assert prepare_cli.main(["--src", str(src), "--dst", str(tmp_path / "prepared")]) == 0
    assert "Note: 1 identities have a single training image" in capsys.readouterr().out
    pid = first[0].name[:4]
    assert [p.name for p in (tmp_path / "prepared" / "train" / pid).iterdir()] == [first[0].name]
    assert not (tmp_path / "prepared" / "val" / pid).exists()
    args = ["--data_dir", str(tmp_path / "prepared"), "--model_dir", str(tmp_path), *FAST, "--total_epoch", "1"]
    assert train_cli.main(args) == 0


def test_a_single_identity_is_refused(prepared_copy, tmp_path, capsys):
    """One identity trained to "train loss 0.000, val error 0.000": a perfect-looking model that learned nothing."""
    for folder in ("train", "val", "train_all"):
        for pid in sorted((prepared_copy / folder).iterdir())[1:]:
            shutil.rmtree(pid)
    assert train_cli.main(["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), *FAST]) == 2
    assert "single identity" in error_line(capsys, "train")
    assert not (tmp_path / "ft_ResNet50").exists()


def test_prepared_folder_without_train_all(prepared_copy, tmp_path, capsys):
    shutil.rmtree(prepared_copy / "train_all")
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), "--train_all", *FAST]
    assert train_cli.main(args) == 2
    assert "train_all not found" in error_line(capsys, "train")


def test_truncated_jpeg_is_named_and_can_be_skipped(prepared_copy, tmp_path, capsys):
    victim = sorted((prepared_copy / "train").rglob("*.jpg"))[3]
    data = victim.read_bytes()
    victim.unlink()  # a hard link: write a new file instead of truncating the shared original
    victim.write_bytes(data[: len(data) // 3])
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), "--total_epoch", "1", *FAST]
    assert train_cli.main(args) == 2
    err = error_line(capsys, "train")
    assert victim.name in err and "--skip_corrupt" in err
    assert train_cli.main([*args, "--skip_corrupt", "--overwrite"]) == 0
    assert f"Skipped 1 unreadable image(s) in {prepared_copy / 'train'}: {victim.name}" in capsys.readouterr().out
    # with DataLoader workers (any machine with more than 2 cores) the error comes from a worker process:
    # still one line naming the file, not the worker's traceback
    assert train_cli.main([*args, "--num_workers", "2", "--name", "workers"]) == 2
    err = error_line(capsys, "train")
    assert victim.name in err and "--skip_corrupt" in err and "worker" not in err
    # at test time (no --skip_corrupt there) the message names the file and what to do, and no missing option
    some_query = sorted((prepared_copy / "query").rglob("*.jpg"))[0]
    shutil.copy(victim, some_query.with_name("0001_c1s1_000001_01.jpg"))
    assert train_cli.main([*args, "--skip_corrupt", "--name", "fine"]) == 0
    capsys.readouterr()
    test_argv = ["--name", "fine", "--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), "--gpu_ids", ""]
    assert test_cli.main(test_argv) == 2
    err = error_line(capsys, "test")
    assert "0001_c1s1_000001_01.jpg cannot be read" in err and "--skip_corrupt" not in err


def test_unparsable_names_at_test_time(prepared_copy, tmp_path, capsys):
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), "--name", "run", "--total_epoch", "1"]
    assert train_cli.main([*args, *FAST]) == 0
    some_pid = next((prepared_copy / "query").iterdir())
    shutil.copy(next(some_pid.iterdir()), some_pid / "holiday.jpg")
    capsys.readouterr()
    assert test_cli.main(["--name", "run", "--data_dir", str(prepared_copy), "--model_dir", str(tmp_path)]) == 2
    assert "holiday.jpg" in error_line(capsys, "test")
    assert not (tmp_path / "run" / "features.pt").exists()


def test_batch_larger_than_the_data_set(prepared_copy, tmp_path, capsys):
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), *FAST, "--batchsize", "999"]
    assert train_cli.main(args) == 2
    assert "--batchsize 999 is larger than the training set" in error_line(capsys, "train")
    assert not (tmp_path / "ft_ResNet50").exists()


def test_an_image_too_large_for_pillow_is_named_and_can_be_skipped(prepared_copy, tmp_path, monkeypatch, capsys):
    """Over Pillow's pixel limit an image gave a 34-line DecompressionBombError, even with --skip_corrupt."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # the guard's limit, scaled down with the image
    victim = sorted((prepared_copy / "train").rglob("*.jpg"))[3]
    victim.unlink()  # a hard link: a new file, not a change to the shared original
    Image.new("RGB", (1500, 1500)).save(victim)  # 2.25 million pixels: over twice the limit, an error
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), *FAST, "--total_epoch", "1"]
    assert train_cli.main(args) == 2
    err = error_line(capsys, "train")
    assert victim.name in err and "too large" in err and "--skip_corrupt" in err
    assert train_cli.main([*args, "--skip_corrupt"]) == 0
    assert f"Skipped 1 unreadable image(s) in {prepared_copy / 'train'}: {victim.name}" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["full disk", "a file", "read-only"])
def test_prepare_names_what_it_cannot_write_in_one_line(tiny_market, tmp_path, monkeypatch, capsys, problem):
    """A full disk, a --dst that is a file or a read-only --dst gave an 18-26-line traceback."""
    import errno
    import os

    import reid_utils.prepare as prepare_module

    dst = tmp_path / "out" / "prepared"
    if problem == "a file":
        dst.parent.mkdir()
        dst.write_text("mine")
    elif problem == "full disk":

        def full(source, target, *args, **kwargs):  # as shutil raises it: the source first, then the target
            raise OSError(errno.ENOSPC, "No space left on device", str(source), None, str(target))

        monkeypatch.setattr(prepare_module.shutil, "copy2", full)
    else:
        real_mkdir = os.mkdir

        def read_only(path, *args, **kwargs):  # the tests may run as root, whom chmod does not stop
            if str(path).startswith(str(tmp_path / "out")):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
    assert prepare_cli.main(["--src", str(tiny_market), "--dst", str(dst), "--link", "copy"]) == 2
    line = error_line(capsys, "prepare")
    assert {"full disk": "no space left", "a file": "is a file", "read-only": "read-only"}[problem] in line
    if problem == "full disk":  # the disk of --dst is full, not that of the source
        assert f"no space left on the disk holding {dst} " in line and str(tiny_market) not in line
    if problem == "a file":
        assert dst.read_text() == "mine"
    else:
        assert not dst.exists() and not leftovers(tmp_path)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("tool", ["test", "prepare", "synthetic", "student", "series"])
def test_ctrl_c_in_the_other_tools_is_one_line(tool, tiny_market, tiny_prepared, tmp_path, monkeypatch, capsys):
    """Ctrl-C gave a 22-64-line KeyboardInterrupt traceback."""
    import nbformat

    import reid_utils.prepare as prepare_module
    import reid_utils.series as series_module
    import reid_utils.student as student_module
    import reid_utils.synthetic as synthetic_module

    if tool == "student":
        monkeypatch.setattr(student_module, "student_notebook", _interrupt)
        code = student_module.main(["--out", str(tmp_path / "out")])
    elif tool == "series":  # --inplace rewrites the committed notebooks: each is written whole or not at all
        notebooks = tmp_path / "notebooks"
        notebooks.mkdir()
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), notebooks / "01_a.ipynb")
        before = (notebooks / "01_a.ipynb").read_bytes()
        monkeypatch.setattr(series_module, "execute", lambda path, *args: nbformat.read(path, as_version=4))

        def half_written(notebook, fp, **kwargs):
            Path(fp).write_text("{")
            raise KeyboardInterrupt

        monkeypatch.setattr(nbformat, "write", half_written)
        code = series_module.main(["--notebooks", str(notebooks), "--inplace", "--out", str(tmp_path)])
        assert (notebooks / "01_a.ipynb").read_bytes() == before and not leftovers(notebooks)
    elif tool == "test":
        monkeypatch.setattr(test_cli, "load_trained_model", _interrupt)
        code = test_cli.main(["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--gpu_ids", ""])
    elif tool == "prepare":
        monkeypatch.setattr(prepare_module, "_place", _interrupt)
        code = prepare_cli.main(["--src", str(tiny_market), "--dst", str(tmp_path / "out")])
    else:
        monkeypatch.setattr(synthetic_module, "_write_images", _interrupt)
        code = synthetic_module.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err  # 130 = 128 + SIGINT, what a shell reports for Ctrl-C
    line = err.strip().splitlines()[-1]
    assert ": interrupted" in line and "Run the same command again" in line and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_gpu_that_does_not_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="this machine has 1"):
        select_device("0,3")


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_total_epoch_zero_or_negative(prepared_copy, tmp_path, capsys, epochs):
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), *FAST, "--total_epoch", epochs]
    assert train_cli.main(args) == 2
    assert "--total_epoch must be at least 1" in error_line(capsys, "train")


@pytest.mark.parametrize(("field", "value"), [("backbone", "resnet34"), ("num_classes", 5)])
def test_checkpoint_from_another_backbone_or_class_count(prepared_copy, tmp_path, capsys, field, value):
    args = ["--data_dir", str(prepared_copy), "--model_dir", str(tmp_path), "--name", "run", "--total_epoch", "1"]
    assert train_cli.main([*args, *FAST]) == 0
    opts_path = tmp_path / "run" / "opts.yaml"
    opts = yaml.safe_load(opts_path.read_text())
    opts[field] = value
    opts_path.write_text(yaml.safe_dump(opts))
    capsys.readouterr()
    argv = ["--name", "run", "--data_dir", str(prepared_copy), "--model_dir", str(tmp_path)]
    assert test_cli.main(argv) == 2
    assert "mixes two runs" in error_line(capsys, "test")  # the checkpoint's own options tell
    checkpoint = torch.load(tmp_path / "run" / "net_last.pth", weights_only=False)
    del checkpoint["options"]  # a checkpoint that does not say which run it is from: its weights do not fit
    torch.save(checkpoint, tmp_path / "run" / "net_last.pth")
    assert test_cli.main(argv) == 2
    assert "does not fit the model described by opts.yaml" in error_line(capsys, "test")


def test_prepare_given_a_folder_of_holiday_photos(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "beach.jpg").write_bytes(b"not really")
    assert prepare_cli.main(["--src", str(tmp_path / "photos"), "--dst", str(tmp_path / "out")]) == 2
    assert "not a Market-1501 folder" in error_line(capsys, "prepare")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def _start_cli(prepared: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "reid_utils.train", "--data_dir", str(prepared), "--model_dir",
               str(model_dir), "--name", "killed", "--total_epoch", "4", "--save_every", "1", "--gpu_ids", "",
               *FAST, *extra]  # fmt: skip
    # A child inherits an ignored SIGINT from a background parent (CI runners, job shells); give it the default
    # disposition back so Python turns Ctrl-C into KeyboardInterrupt, as in a terminal or Jupyter.
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "stop-button"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_prepared, tmp_path, how, capsys):
    run = tmp_path / "killed"
    process = _start_cli(tiny_prepared, tmp_path)
    _wait_for(run / "net_002.pth", process)
    process.send_signal(how)
    out, err = process.communicate(timeout=60)
    if how == signal.SIGINT:  # Ctrl-C / Jupyter's stop button: a friendly line, not a traceback
        assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert not (run / "net_last.pth").exists() and not leftovers(run)
    newest = max(run.glob("net_0*.pth"))
    saved_epoch = torch.load(newest, weights_only=False)["epoch"]  # the checkpoint on disk is whole
    # the same command with --resume, in this process (a second Python start would only cost time)
    command = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "killed", "--total_epoch",
               "4", "--save_every", "1", "--gpu_ids", "", *FAST, "--resume"]  # fmt: skip
    capsys.readouterr()
    assert train_cli.main(command) == 0, capsys.readouterr().err
    assert f"from {newest.name} (epoch {saved_epoch} of 4)" in capsys.readouterr().out
    assert torch.load(run / "net_last.pth", weights_only=False)["epoch"] == 4


def _twice(path: Path) -> list[nbformat.NotebookNode]:
    """The notebook's code cells, then the same cells again."""
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    return [nbformat.v4.new_code_cell(cell.source) for cell in code + code]


def _kinds(cell) -> list[tuple]:
    """Output kinds in order, a run of stream chunks counted once (the kernel may split a print in two)."""
    kinds = [(o.output_type, o.get("name")) for o in cell.outputs]
    return [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1] or kind[0] != "stream"]


def test_running_a_notebook_twice_in_one_kernel():
    """A learner runs all cells again: the same outputs, no extra figures, no warnings. Notebooks 01 and 02 share
    one kernel here (one start fewer); that each also runs alone in a fresh kernel is what nbval checks."""
    from nbclient import NotebookClient

    parts = [_twice(ROOT / "notebooks" / f"{name}.ipynb") for name in ("01_data_preparation", "02_model")]
    nb = nbformat.v4.new_notebook(cells=[cell for part in parts for cell in part])
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    start = 0
    for part in parts:
        cells, start = nb.cells[start : start + len(part)], start + len(part)
        half = len(cells) // 2
        for first, second in zip(cells[:half], cells[half:], strict=True):
            assert _kinds(first) == _kinds(second), first.source[:80]  # the same outputs: no extra figures
            assert not any(o.get("name") == "stderr" for o in first.outputs + second.outputs)
