"""Bad input, interruption and re-running: each case a user can cause, answered by one clear message.

Every CLI error must exit with code 2, print one ``<tool>: error:`` line (no traceback) and leave nothing
half-written behind.
"""

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


def test_raw_market_folder_where_a_prepared_one_is_expected(tiny_market, tmp_path, capsys):
    assert train_cli.main(["--data_dir", str(tiny_market), "--model_dir", str(tmp_path), *FAST]) == 2
    assert "python -m reid_utils.prepare" in error_line(capsys, "train")


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
    assert "smaller --batchsize" in error_line(capsys, "train")
    assert not list((tmp_path / "ft_ResNet50").glob("*.pth"))


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
