"""The run folder: nothing a user owns is lost, mixed or silently wrong.

A run folder is copied, moved, resumed from another directory, written by two trainings at once, left with
a stale or damaged checkpoint, or put somewhere that cannot be written. Each case ends in the right run,
or in one clear line and exit code 2.
"""

import contextlib
import errno
import io
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

import reid_utils.profiles as profiles_module
import reid_utils.runs as runs_module
import reid_utils.train as train_module
from reid_utils import test as test_cli
from reid_utils import train as train_cli
from reid_utils.runs import RunLock, TrainError, checkpoints_newest_first, latest_checkpoint, load_checkpoint
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

    def crash_after_epoch_3(checkpoint, path, **kwargs):
        real_save(checkpoint, path, **kwargs)
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

    def diverge_in_epoch_3(model, loader, phase, *rest):
        result = real_step(model, loader, phase, *rest)
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


# --------------------------------------------------------------------------- nothing lost (issue 23)


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C (KeyboardInterrupt) in the training phase of ``epoch``, as the stop button would."""
    real_phase, calls = train_module.train_one_phase, []

    def phase(model, loader, name, *args):
        calls.append(name)
        if name == "train" and calls.count("train") == epoch:
            raise KeyboardInterrupt
        return real_phase(model, loader, name, *args)

    monkeypatch.setattr(train_module, "train_one_phase", phase)


def tiny_profile(monkeypatch, tiny_prepared):
    """Notebook 03's profile, shrunk to the run of ``options()`` (two epochs, a checkpoint after each)."""
    profile = {k: v for k, v in vars(options(tiny_prepared, "unused")).items() if k not in ("data_dir", "model_dir")}
    monkeypatch.setitem(profiles_module.PROFILES, "tiny", profile)


@pytest.mark.parametrize("stopped", ["after epoch 1", "while net_last.pth was copied"])
def test_notebooks_continue_a_run_notebook_03_did_not_finish(finished, tiny_prepared, tmp_path, monkeypatch, capsys,
                                                             stopped):  # fmt: skip
    """Notebooks 04/05 found no net_last.pth, deleted the checkpoints and trained from epoch 0 (59 GPU epochs lost
    on market-gpu). Now they go on from the newest checkpoint, to the very weights of an uninterrupted run."""
    tiny_profile(monkeypatch, tiny_prepared)
    copy = copy_run(finished, tmp_path)
    for later in ("net_002.pth", "net_last.pth") if stopped == "after epoch 1" else ("net_last.pth",):
        (copy / later).unlink()
    kept = {p.name: p.read_bytes() for p in copy.glob("net_*.pth")}
    assert profiles_module.trained_run(tiny_prepared, copy.parent, "tiny") == copy
    out = capsys.readouterr().out
    done = 1 if stopped == "after epoch 1" else 2
    assert f"stopped after epoch {done} of 2: continuing it from net_00{done}.pth" in out
    assert all((copy / name).read_bytes() == data for name, data in kept.items())  # not deleted, not redone
    resumed, uninterrupted = load_checkpoint(copy / "net_last.pth"), load_checkpoint(finished / "net_last.pth")
    assert resumed["epoch"] == 2
    assert resumed["history"]["train_loss"] == pytest.approx(uninterrupted["history"]["train_loss"], abs=1e-6)
    for key, value in uninterrupted["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


def test_a_users_error_in_a_notebook_is_the_one_line_the_command_line_prints(finished, tiny_prepared, tmp_path):
    """A TrainError in Jupyter showed the package's traceback above the message; now the message alone."""
    from IPython.core.interactiveshell import InteractiveShell

    copy = copy_run(finished, tmp_path)
    shell = InteractiveShell.instance()
    shell.user_ns.update(train=train, opts=options(tiny_prepared, copy.parent))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        shell.run_cell("train(opts, quiet=True)")  # the run exists: neither resume nor overwrite
    assert out.getvalue().splitlines() == [f"TrainError: {copy} already holds a run. Pass --resume to continue it, "
                                           "or choose another --name."]  # fmt: skip


def test_a_notebook_interrupt_is_one_line_and_the_cell_run_again_continues(finished, tiny_prepared, tmp_path,
                                                                            monkeypatch, capsys):  # fmt: skip
    """Notebook 03 trains with resume='auto': stopped in epoch 2, it said nothing useful (a KeyboardInterrupt
    from inside torch) and the cell run again started at epoch 0."""
    copy = tmp_path / "models"
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt) as stop:
        train(options(tiny_prepared, copy), resume="auto", quiet=True)
    message = str(stop.value)
    assert "in epoch 2 of 2" in message and "net_001.pth" in message and "resume='auto'" in message
    assert stop.value._render_traceback_() == [f"TrainingInterrupted: {message}"]  # all Jupyter shows
    monkeypatch.undo()
    again = options(tiny_prepared, copy)
    history = train(again, resume="auto")  # the cell, run again
    assert again.num_classes == 8  # filled in, as for a run from the start (notebook 03 computes chance from it)
    assert "Resuming run from net_001.pth (epoch 1 of 2)" in capsys.readouterr().out
    expected = load_checkpoint(finished / "net_last.pth")["history"]["train_loss"]
    assert history["train_loss"] == pytest.approx(expected, abs=1e-6)
    assert history["curve_updates"] == 2  # the redraw before the interruption counts too


def test_resume_auto_continues_only_an_unfinished_run_of_the_same_options(finished, tiny_prepared, tmp_path):
    """A finished run, or one with other options, is trained afresh (and replaced at the new first checkpoint)."""
    copy = copy_run(finished, tmp_path)

    def decision(**changes):
        requested = options(tiny_prepared, tmp_path, **changes)
        return runs_module.auto_resume(copy, checkpoints_newest_first(copy), requested)

    assert decision() == (False, "")  # finished: a cell run again trains again, as it always did
    assert decision(total_epoch=3) == (True, "")  # more epochs asked for: go on
    (copy / "net_last.pth").unlink()
    assert decision(gpu_ids="0", num_workers=2) == (True, "")  # the machine's settings are not the run's
    resume, notice = decision(lr=0.001)
    assert not resume and "lr 0.002 -> 0.001" in notice and "training afresh" in notice


@pytest.mark.parametrize("name", ["..", "."])
def test_a_name_that_points_outside_the_model_dir_is_refused(tiny_prepared, tmp_path, capsys, name):
    """--name .. trained into the parent of --model_dir, over a train.jpg and opts.yaml already there."""
    parent = tmp_path / "work"
    (parent / "model").mkdir(parents=True)
    for mine in ("train.jpg", "opts.yaml", "features.pt"):
        (parent / mine).write_text("the user's")
    before = sorted(p.name for p in parent.rglob("*"))
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(parent / "model"), "--name", name, *FAST]
    assert train_cli.main([*args, "--total_epoch", "1", "--overwrite"]) == 2
    assert "--name" in last_error(capsys, "train")
    assert test_cli.main(["--data_dir", str(tiny_prepared), "--model_dir", str(parent / "model"), "--name", name]) == 2
    assert "--name" in last_error(capsys, "test")
    assert sorted(p.name for p in parent.rglob("*")) == before
    assert all((parent / mine).read_text() == "the user's" for mine in ("train.jpg", "opts.yaml", "features.pt"))


def test_a_folder_of_the_users_is_not_trained_into(tiny_prepared, tmp_path, capsys):
    """A --name that happens to be a folder of other files: training would write opts.yaml and train.jpg there."""
    mine = tmp_path / "model" / "results"
    mine.mkdir(parents=True)
    (mine / "opts.yaml").write_text("my own settings")
    (mine / "notes.txt").write_text("mine")
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(mine.parent), "--name", "results", *FAST]
    assert train_cli.main([*args, "--total_epoch", "1"]) == 2
    error = last_error(capsys, "train")
    assert "not a run folder" in error and "notes.txt" in error
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "opts.yaml"]
    assert (mine / "opts.yaml").read_text() == "my own settings"


def _with_a_corrupt_image(tiny_prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    victim = sorted((data / "train").rglob("*.jpg"))[5]
    victim.unlink()
    victim.write_bytes(b"not a jpeg")
    return data


@pytest.mark.parametrize("failure", ["batch size", "corrupt image", "Ctrl-C", "full disk"])
def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(
    finished, tiny_prepared, tmp_path, monkeypatch, capsys, failure
):
    """--overwrite deleted the old run first: a new run that then failed left nothing of either."""
    copy = copy_run(finished, tmp_path)
    (copy / "features.pt").write_bytes(b"features of the earlier run")
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.name != ".lock"}
    data, extra = tiny_prepared, []
    if failure == "batch size":
        extra = ["--batchsize", "160"]  # a typo for 16
    elif failure == "corrupt image":
        data = _with_a_corrupt_image(tiny_prepared, tmp_path)
    elif failure == "Ctrl-C":
        interrupt_in_epoch(monkeypatch, 1)
    else:
        disk_full_on(monkeypatch, "net_001.pth")
    run = ["--model_dir", str(copy.parent), "--name", "run", *FAST, "--total_epoch", "1", "--save_every", "1"]
    code = train_cli.main(["--data_dir", str(data), *run, "--overwrite", *extra])
    err = capsys.readouterr().err
    assert code == (130 if failure == "Ctrl-C" else 2) and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.name != ".lock"} == before  # all of it, unchanged
    if failure in ("Ctrl-C", "full disk"):
        assert "the earlier run in" in err and "is unchanged" in err and "--resume" not in err
    if failure == "Ctrl-C":  # once a new run has written its first checkpoint, the earlier one goes
        monkeypatch.undo()
        assert train_cli.main(["--data_dir", str(tiny_prepared), *run, "--overwrite"]) == 0
        assert sorted(p.name for p in copy.iterdir()) == [".lock", "net_001.pth", "net_last.pth", "opts.yaml",
                                                          "train.jpg"]  # fmt: skip


class DiskWithLittleSpace(io.RawIOBase):
    """A file on a disk with ``free`` bytes left: the write that needs more fails with ENOSPC, as a full disk's."""

    def __init__(self, file, free: int) -> None:
        self.file, self.free = file, free

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.free -= len(data)
        return self.file.write(data)


def disk_full_on(monkeypatch, name: str) -> None:
    """Writing the file ``name`` fails as on a disk that fills up within it (a kilobyte into the file).

    ``torch.save`` then ends, as on a real full disk, in ``RuntimeError: [enforce fail at inline_container.cc:672]
    . unexpected pos``, with the write's ``OSError`` behind it; train.jpg fails with the ``OSError``.
    """
    import matplotlib.figure

    from reid_utils import runs as runs_module

    real_save, real_savefig = runs_module.torch.save, matplotlib.figure.Figure.savefig
    ours = f".{name}.tmp-"

    def save(obj, file, *args, **kwargs):
        if ours not in str(getattr(file, "name", file)):
            return real_save(obj, file, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)):  # torch.save(obj, path)
            with open(file, "wb") as opened:
                return real_save(obj, DiskWithLittleSpace(opened, 1000), *args, **kwargs)
        return real_save(obj, DiskWithLittleSpace(file, 1000), *args, **kwargs)

    def savefig(figure, fname, *args, **kwargs):
        if ours in str(fname):
            raise OSError(errno.ENOSPC, "No space left on device", str(fname))
        return real_savefig(figure, fname, *args, **kwargs)

    monkeypatch.setattr(runs_module.torch, "save", save)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


@pytest.mark.parametrize("file", ["net_001.pth", "train.jpg"])
def test_a_full_disk_is_one_line_and_its_advice_works(tiny_prepared, tmp_path, monkeypatch, capsys, file):
    """A full disk gave 35 lines ending in `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
    pos`, not a word about the disk. (train.jpg is drawn right after net_001.pth: the run has a checkpoint.)"""
    disk_full_on(monkeypatch, file)
    epochs = "1" if file == "net_001.pth" else "2"
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "full", *FAST,
            "--total_epoch", epochs, "--save_every", "1"]  # fmt: skip
    assert train_cli.main(args) == 2
    error = last_error(capsys, "train")
    assert "no space left on the disk" in error and file in error
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # nothing half-written
    monkeypatch.undo()  # space was freed
    if file == "net_001.pth":
        assert "run the same command again" in error and "--resume" not in error
        assert not (tmp_path / "full").exists()
        assert train_cli.main(args) == 0
    else:
        assert "net_001.pth" in error and "run the same command with --resume" in error
        assert train_cli.main([*args, "--resume"]) == 0
        assert "Resuming full from net_001.pth" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "full" / "net_last.pth")["epoch"] == int(epochs)


def test_test_on_a_full_disk_prints_its_numbers_and_names_the_disk(finished, tiny_prepared, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    copy = copy_run(finished, tmp_path)
    disk_full_on(monkeypatch, "features.pt")
    argv = ["--name", "run", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
    assert test_cli.main(argv) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert "Rank@1" in captured.out and "Traceback" not in captured.err
    assert "features.pt" in error and "no space left on the disk" in error
    assert not [p for p in copy.iterdir() if ".tmp-" in p.name or p.name == "features.pt"]


def test_ctrl_c_before_the_first_checkpoint_advises_what_works(tiny_prepared, tmp_path, monkeypatch, capsys):
    """It said `Run the same command with --resume`, and that failed: `--resume: no checkpoint`."""
    interrupt_in_epoch(monkeypatch, 1)
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "early", *FAST,
            "--total_epoch", "1"]  # fmt: skip
    assert train_cli.main(args) == 130  # 128 + SIGINT: what a shell reports for Ctrl-C
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("train: interrupted in epoch 1 of 1; no checkpoint of this run was written yet")
    assert "Run the same command again" in line and "--resume" not in line and "Traceback" not in err
    assert not (tmp_path / "early").exists()
    monkeypatch.undo()
    assert train_cli.main(args) == 0


def test_a_run_that_cannot_fit_its_checkpoint_on_the_disk_stops_before_the_first_epoch(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    import reid_utils.files as files_module

    trained = []
    monkeypatch.setattr(train_module, "train_one_phase", lambda *a: trained.append(1))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files_module.shutil, "disk_usage", lambda path: usage._replace(free=5_000_000))
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "small", *FAST]
    assert train_cli.main(args) == 2
    error = last_error(capsys, "train")
    assert "5.0 MB free" in error and "a checkpoint of this run takes about" in error and trained == []
    assert not (tmp_path / "small").exists()


def test_checkpoints_are_on_the_disk_before_they_get_their_name(tmp_path, monkeypatch):
    """Without fsync before the rename, a power cut can leave net_XXX.pth empty under its final name."""
    from reid_utils import runs as runs_module

    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def record_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        opened[fd] = str(path)
        return fd

    monkeypatch.setattr(os, "open", record_open)
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", opened.get(fd))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    runs_module.save_checkpoint({"epoch": 1, "model": {}}, tmp_path / "net_001.pth")
    temporary = next(path for kind, path in events if kind == "replace")
    assert events.index(("fsync", temporary)) < events.index(("replace", temporary))
    assert ("fsync", str(tmp_path)) in events[events.index(("replace", temporary)) :]  # the rename itself too
