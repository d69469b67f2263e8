"""The run folder: nothing a user owns is lost, mixed or silently wrong.

A run folder is copied, moved, resumed from another directory, written by two trainings at once, left with
a stale or damaged checkpoint, or put somewhere that cannot be written. Each case ends in the right run,
or in one clear line and exit code 2.
"""

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

import reid_utils.train as train_module
from reid_utils import test as test_cli
from reid_utils import train as train_cli
from reid_utils.runs import RunLock, TrainError, latest_checkpoint, load_checkpoint
from reid_utils.train import TrainOptions, train

FAST = ["--backbone", "resnet18", "--height", "32", "--width", "16", "--batchsize", "16", "--no_pretrained",
        "--gpu_ids", "", "--lr", "0.002"]  # fmt: skip


def last_error(capsys, tool: str) -> str:
    """The one error line a CLI printed (a progress bar may stand above it); no traceback anywhere."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{tool}: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


def options(prepared, model_dir, **changes) -> TrainOptions:
    base = dict(name="run", data_dir=str(prepared), model_dir=str(model_dir), gpu_ids="", backbone="resnet18",
                height=32, width=16, batchsize=16, total_epoch=2, save_every=1, pretrained=False, lr=0.002)  # fmt: skip
    return TrainOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def finished(tiny_prepared, tmp_path_factory):
    """A finished two-epoch run: net_001.pth, net_002.pth, net_last.pth (epoch 2)."""
    model_dir = tmp_path_factory.mktemp("runs")
    train(options(tiny_prepared, model_dir), quiet=True)
    return model_dir / "run"


def copy_run(finished, tmp_path, name="run"):
    target = tmp_path / "models" / name
    shutil.copytree(finished, target)
    return target


def snapshot(folder):
    """Every file of the run as it stands (the lock file aside: taking the lock is what a refusal does first)."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.name != ".lock"}


# --------------------------------------------------------------------------- resume: where and with what


def test_resuming_a_copied_run_writes_into_the_copy_only(finished, tiny_prepared, tmp_path, monkeypatch, capsys):
    original = snapshot(finished)
    copy = copy_run(finished, tmp_path, "moved")
    for later in ("net_002.pth", "net_last.pth"):
        (copy / later).unlink()
    monkeypatch.chdir(tmp_path)  # another working directory than the one training started in
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "moved", *FAST]
    assert train_cli.main([*args, "--resume", "--total_epoch", "3"]) == 0
    assert snapshot(finished) == original  # the original run is untouched
    saved = yaml.safe_load((copy / "opts.yaml").read_text())
    assert saved["name"] == "moved" and saved["model_dir"] == str(copy.parent) and saved["total_epoch"] == 3
    assert load_checkpoint(copy / "net_last.pth")["epoch"] == 3
    assert "Resuming moved from net_001.pth (epoch 1 of 3)" in capsys.readouterr().out


def test_data_dir_given_now_wins_on_resume(finished, tiny_prepared, tmp_path):
    copy = copy_run(finished, tmp_path)
    saved = yaml.safe_load((copy / "opts.yaml").read_text())
    saved["data_dir"] = "data/prepared/somewhere-else"  # relative to a directory we are not in
    (copy / "opts.yaml").write_text(yaml.safe_dump(saved))
    history = train(options(tiny_prepared, copy.parent, total_epoch=3), resume=True, quiet=True)
    assert len(history["train_loss"]) == 3
    assert yaml.safe_load((copy / "opts.yaml").read_text())["data_dir"] == str(tiny_prepared)


def test_changed_training_options_are_named_and_network_changes_refused(finished, tiny_prepared, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "run", *FAST, "--resume"]
    assert train_cli.main([*args[:-1], "--backbone", "resnet34", "--resume", "--total_epoch", "3"]) == 2
    assert "--backbone" in last_error(capsys, "train")
    assert train_cli.main([*[a if a != "0.002" else "0.01" for a in args], "--total_epoch", "3"]) == 0
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if "--lr" in line]
    assert len(notice) == 1 and "0.01" in notice[0] and "0.002" in notice[0]
    assert yaml.safe_load((copy / "opts.yaml").read_text())["lr"] == 0.002  # the run keeps its own


def test_a_total_epoch_below_what_is_done_is_refused(finished, tiny_prepared, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "run", *FAST]
    before = snapshot(copy)
    assert train_cli.main([*args, "--resume", "--total_epoch", "1"]) == 2
    assert "--total_epoch 1" in last_error(capsys, "train")
    assert snapshot(copy) == before


# --------------------------------------------------------------------------- one writer at a time


def test_a_second_training_into_a_run_in_use_is_refused(finished, tiny_prepared, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "run", *FAST]
    before = snapshot(copy)
    with RunLock(copy):  # another training holds the folder
        assert train_cli.main([*args, "--overwrite"]) == 2
        assert "in use" in last_error(capsys, "train")
        assert train_cli.main([*args, "--resume", "--total_epoch", "3"]) == 2
        assert "in use" in last_error(capsys, "train")
    assert snapshot(copy) == before
    assert train_cli.main([*args, "--resume", "--total_epoch", "3"]) == 0  # free again


def _hold_the_lock(folder, locked) -> None:
    RunLock(folder).__enter__()
    locked.set()
    time.sleep(60)


def test_a_killed_training_leaves_no_stuck_lock(finished, tmp_path):
    copy = copy_run(finished, tmp_path)
    context = multiprocessing.get_context("fork")  # another process holds the lock (it computes nothing)
    locked = context.Event()
    process = context.Process(target=_hold_the_lock, args=(copy, locked))
    process.start()
    assert locked.wait(30)
    with pytest.raises(TrainError, match="in use"), RunLock(copy):
        pass
    process.kill()  # SIGKILL: the process gets no chance to let go
    process.join(30)
    with RunLock(copy):  # the kernel released the killed process's lock
        pass


def test_test_refuses_a_folder_that_mixes_two_runs(finished, tiny_prepared, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    saved = yaml.safe_load((copy / "opts.yaml").read_text())
    saved["height"], saved["width"] = 64, 32  # another run's options beside these checkpoints: the weights still fit
    (copy / "opts.yaml").write_text(yaml.safe_dump(saved))
    argv = ["--name", "run", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
    assert test_cli.main(argv) == 2
    error = last_error(capsys, "test")
    assert "opts.yaml" in error and "height" in error
    assert not (copy / "features.pt").exists()


# --------------------------------------------------------------------------- the newest checkpoint


def test_the_newest_checkpoint_is_the_highest_epoch(finished, tiny_prepared, tmp_path, monkeypatch):
    copy = copy_run(finished, tmp_path)
    real_save = train_module.save_checkpoint

    def crash_after_epoch_3(checkpoint, path):
        real_save(checkpoint, path)
        if path.name == "net_003.pth":
            raise KeyboardInterrupt  # the extended run dies after epoch 3: net_last.pth (epoch 2) is stale

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(options(tiny_prepared, copy.parent, total_epoch=4), resume=True, quiet=True)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert load_checkpoint(copy / "net_last.pth")["epoch"] == 2
    assert latest_checkpoint(copy).name == "net_003.pth"
    history = train(options(tiny_prepared, copy.parent, total_epoch=4), resume=True, quiet=True)
    assert len(history["train_loss"]) == 4 and load_checkpoint(copy / "net_last.pth")["epoch"] == 4
    assert load_checkpoint(copy / "net_003.pth")["epoch"] == 3  # not redone


# --------------------------------------------------------------------------- damaged and unwritable files


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_named_and_resume_takes_the_previous_good_one(
    finished, tiny_prepared, tmp_path, capsys, damage
):
    copy = copy_run(finished, tmp_path)
    last = copy / "net_last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if damage == "truncated" else b"")
    (copy / "net_002.pth").unlink()
    argv = ["--name", "run", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
    assert test_cli.main(argv) == 2
    assert "net_last.pth" in last_error(capsys, "test")
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "run", *FAST]
    assert train_cli.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "net_last.pth" in out and "Resuming run from net_001.pth" in out
    assert load_checkpoint(last)["epoch"] == 2  # redone from epoch 1, and whole again


def test_a_malformed_opts_yaml_is_named(finished, tiny_prepared, tmp_path, capsys):
    copy = copy_run(finished, tmp_path)
    (copy / "opts.yaml").write_text("name: run\nlr: [0.002\n")
    argv = ["--name", "run", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
    assert test_cli.main(argv) == 2
    assert "opts.yaml" in last_error(capsys, "test")
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--name", "run", *FAST, "--resume"]
    assert train_cli.main(args) == 2
    assert "opts.yaml" in last_error(capsys, "train")


def test_a_model_dir_that_is_a_file_is_refused_before_any_work(tiny_prepared, tmp_path, capsys, monkeypatch):
    (tmp_path / "model").write_text("not a folder")
    loaded = []
    monkeypatch.setattr(train_module, "build_dataloaders", lambda *a, **k: loaded.append(1))
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path / "model"), *FAST]
    assert train_cli.main(args) == 2
    assert "--model_dir" in last_error(capsys, "train") and loaded == []


def test_an_unwritable_run_folder_is_refused_before_any_work(tiny_prepared, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(train_module, "build_dataloaders", lambda *a, **k: loaded.append(1))
    real_open = os.open

    def read_only(path, flags, *rest):  # the tests may run as root, whom chmod does not stop
        if str(path).startswith(str(tmp_path / "model")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *rest)

    monkeypatch.setattr(os, "open", read_only)
    (tmp_path / "model").mkdir()
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path / "model"), *FAST]
    assert train_cli.main(args) == 2
    error = last_error(capsys, "train")
    assert "cannot write" in error and "Permission denied" in error and loaded == []


def test_test_prints_its_numbers_before_saving_and_says_what_could_not_be_written(
    finished, tiny_prepared, tmp_path, capsys
):
    copy = copy_run(finished, tmp_path)
    (copy / "features.pt").mkdir()  # something in the way that cannot be replaced by a file
    argv = ["--name", "run", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
    assert test_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "Rank@1" in captured.out and "mAP" in captured.out
    assert "features.pt" in captured.err.strip().splitlines()[-1] and "Traceback" not in captured.err
    assert not [p for p in copy.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- numbers that cannot work


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "nan"), ("--lr", "inf"), ("--warm_epoch", "-1"), ("--triplet_margin", "-0.1"),
     ("--height", "100000"), ("--width", "4"), ("--seed", "-1"), ("--erasing_p", "nan"), ("--save_every", "0"),
     ("--num_workers", "-2"), ("--label_smoothing", "nan"), ("--linear_num", "0")],
)  # fmt: skip
def test_options_that_cannot_work_are_refused(tiny_prepared, tmp_path, capsys, flag, value):
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), *FAST, flag, value]
    assert train_cli.main(args) == 2
    assert flag in last_error(capsys, "train")
    assert not (tmp_path / "ft_ResNet50").exists()


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_prepared, tmp_path, capsys, monkeypatch
):
    real_step = train_module.train_one_phase
    calls = []

    def diverge_in_epoch_3(model, loader, phase, criterion, optimizer, device):
        result = real_step(model, loader, phase, criterion, optimizer, device)
        calls.append(phase)
        if calls.count("train") == 3 and phase == "train":
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(math.nan)
            return result._replace(running_loss=math.nan)
        return result

    monkeypatch.setattr(train_module, "train_one_phase", diverge_in_epoch_3)
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "nan", *FAST]
    assert train_cli.main([*args, "--total_epoch", "4", "--save_every", "1"]) == 2
    error = last_error(capsys, "train")
    assert "epoch 3" in error and "net_002.pth" in error and "--lr" in error
    assert sorted(p.name for p in (tmp_path / "nan").glob("*.pth")) == ["net_001.pth", "net_002.pth"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "nan" / "net_002.pth")["model"].values())


# --------------------------------------------------------------------------- leftovers of killed runs


def _a_finished_process_id() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_the_next_run_removes_what_killed_runs_left(finished, tiny_prepared, tmp_path):
    copy = copy_run(finished, tmp_path)
    dead = _a_finished_process_id()
    stale = copy / f".net_003.pth.tmp-{dead}"
    stale.write_bytes(b"half a checkpoint")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = copy / f".net_003.pth.tmp-{sleeper.pid}"  # another process's, still being written
        running.write_bytes(b"in progress")
        train(options(tiny_prepared, copy.parent, total_epoch=3), resume=True, quiet=True)
        assert not stale.exists() and running.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_prepare_removes_the_folders_killed_prepares_left(tiny_market, tmp_path):
    from reid_utils.prepare import prepare_market

    dead = _a_finished_process_id()
    stale = tmp_path / f".prepared.tmp-{dead}"
    (stale / "train").mkdir(parents=True)
    other = tmp_path / f".someone-else.tmp-{dead}"  # not prepare's: left alone
    other.mkdir()
    prepare_market(tiny_market, tmp_path / "prepared", quiet=True)
    assert not stale.exists() and other.exists()
