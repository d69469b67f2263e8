import math
import re

import pytest
import torch
import yaml

import reid_utils.speed as speed_module
import reid_utils.train as train_module
from reid_utils.losses import ReIDLoss
from reid_utils.model import select_device
from reid_utils.runs import latest_checkpoint
from reid_utils.train import TrainError, TrainOptions, lr_factor, main, train


def tiny_options(data_dir, model_dir, **changes) -> TrainOptions:
    base = dict(
        name="tiny", data_dir=str(data_dir), model_dir=str(model_dir), gpu_ids="", backbone="resnet18",
        height=32, width=16, batchsize=16, total_epoch=4, save_every=2, pretrained=False, lr=0.002,
    )  # fmt: skip
    base.update(changes)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def finished_run(tiny_prepared, tmp_path_factory):
    """One uninterrupted 4-epoch run, shared by several tests."""
    model_dir = tmp_path_factory.mktemp("model")
    opts = tiny_options(tiny_prepared, model_dir)
    history = train(opts, quiet=True)
    return opts, history, model_dir / "tiny"


def test_loss_falls_and_the_short_last_batch_is_skipped(finished_run, tiny_prepared):
    opts, history, _ = finished_run
    n_train = sum(1 for _ in (tiny_prepared / "train").rglob("*.jpg"))
    assert n_train % opts.batchsize != 0  # the case the skip is for
    assert history["skipped"] == [1] * opts.total_epoch  # at most the one short batch per epoch
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert len(history["val_err"]) == len(history["train_loss"]) == opts.total_epoch


def test_checkpoints_at_the_right_epochs(finished_run):
    opts, history, folder = finished_run
    assert sorted(p.name for p in folder.glob("*.pth")) == ["net_002.pth", "net_004.pth", "net_last.pth"]
    assert torch.load(folder / "net_002.pth", weights_only=False)["epoch"] == 2
    last = torch.load(folder / "net_last.pth", weights_only=False)
    assert last["epoch"] == 4 and set(last) >= {"model", "optimizer", "scheduler", "history"}
    # the last epoch's two checkpoints: the same bytes, in two files (a write to one never changes the other)
    assert (folder / "net_004.pth").read_bytes() == (folder / "net_last.pth").read_bytes()
    assert not (folder / "net_004.pth").samefile(folder / "net_last.pth")
    saved = yaml.safe_load((folder / "opts.yaml").read_text())
    assert saved["backbone"] == "resnet18" and saved["num_classes"] == 8
    assert (folder / "train.jpg").stat().st_size > 1000
    assert history["curve_updates"] == 2  # redrawn at epochs 2 and 4


def test_short_run_still_gets_net_last(tiny_prepared, tmp_path):
    train(tiny_options(tiny_prepared, tmp_path, total_epoch=1, save_every=10), quiet=True)
    assert [p.name for p in (tmp_path / "tiny").glob("*.pth")] == ["net_last.pth"]


def test_resume_after_interruption_reaches_the_same_weights(finished_run, tiny_prepared, tmp_path, monkeypatch):
    _, _, reference = finished_run
    real_save = train_module.save_checkpoint

    def save_then_die(obj, path, **kwargs):
        real_save(obj, path, **kwargs)
        if path.name == "net_002.pth":
            raise KeyboardInterrupt  # the stop button, right after the first checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_options(tiny_prepared, tmp_path), quiet=True)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert latest_checkpoint(tmp_path / "tiny").name == "net_002.pth"
    assert not list((tmp_path / "tiny").glob(".*tmp*"))  # nothing half-written

    history = train(tiny_options(tiny_prepared, tmp_path), resume=True, quiet=True)
    assert len(history["train_loss"]) == 4
    resumed = torch.load(tmp_path / "tiny" / "net_last.pth", weights_only=False)["model"]
    expected = torch.load(reference / "net_last.pth", weights_only=False)["model"]
    for key, value in expected.items():
        assert torch.allclose(resumed[key].float(), value.float(), atol=1e-6), key


def test_existing_run_needs_resume_or_overwrite(finished_run, tiny_prepared):
    opts, _, folder = finished_run
    with pytest.raises(TrainError, match="--resume"):
        train(tiny_options(tiny_prepared, folder.parent), quiet=True)


def test_batch_larger_than_the_data_is_said_before_the_first_batch(tiny_prepared, tmp_path, monkeypatch):
    """It was reported only after a whole pass over the data; the size that fits is known before the first batch."""
    passes = []
    monkeypatch.setattr(train_module, "train_one_phase", lambda *args: passes.append(args[2]))
    with pytest.raises(TrainError, match=r"Use --batchsize (\d+) or less") as error:
        train(tiny_options(tiny_prepared, tmp_path, batchsize=512), quiet=True)
    assert passes == []
    monkeypatch.undo()
    fits = int(re.search(r"--batchsize (\d+) or less", str(error.value))[1])
    history = train(tiny_options(tiny_prepared, tmp_path, batchsize=fits, total_epoch=1), quiet=True)  # the advice
    assert history["skipped"] == [0]


def test_device_selection_falls_back_to_cpu(capsys):
    device, ids = select_device("", quiet=True)
    assert device.type == "cpu" and ids == []
    if not torch.cuda.is_available():
        device, ids = select_device("0")
        assert device.type == "cpu" and "CPU" in capsys.readouterr().out
    with pytest.raises(ValueError, match="gpu_ids"):
        select_device("zero")


def test_step_decay_at_two_thirds():
    assert [lr_factor(e, 60) for e in (0, 39, 40, 59)] == [1.0, 1.0, 0.1, 0.1]
    assert lr_factor(0, 10, cosine=True) == 1.0 and lr_factor(5, 10, cosine=True) == pytest.approx(0.5)


def test_cli_end_to_end(tiny_prepared, tmp_path, capsys):
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--name", "cli", "--gpu_ids", "0",
            "--backbone", "resnet18", "--height", "32", "--width", "16", "--batchsize", "8",
            "--save_every", "1", "--no_pretrained", "--train_all"]  # fmt: skip
    assert main([*args, "--total_epoch", "2"]) == 0
    assert "Done: 2 epochs" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.pth")) == [
        "net_001.pth",
        "net_002.pth",
        "net_last.pth",
    ]
    assert main([*args, "--total_epoch", "3", "--resume"]) == 0  # continue the same run to epoch 3
    assert torch.load(tmp_path / "cli" / "net_last.pth", weights_only=False)["epoch"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--total_epoch", "0"], "--total_epoch"),
        (["--resume"], "no checkpoint"),
        (["--gpu_ids", "x"], "gpu_ids"),
    ],
)
def test_cli_user_errors_exit_2(tiny_prepared, tmp_path, capsys, extra, message):
    code = main(["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--no_pretrained", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_missing_data_dir(tmp_path, capsys):
    assert main(["--data_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_label_smoothing_and_triplet_terms():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    features = torch.randn(8, 5)
    plain = ReIDLoss()(logits, labels, features)
    assert torch.isclose(plain, torch.nn.functional.cross_entropy(logits, labels))
    smooth = ReIDLoss(label_smoothing=0.1)(logits, labels)
    assert torch.isclose(smooth, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    with_triplet = ReIDLoss(triplet_weight=1.0)(logits, labels, features)
    assert with_triplet > plain  # random features violate the margin
    assert torch.isclose(ReIDLoss(triplet_weight=1.0)(logits, labels, None), plain)  # val phase: no features


def test_all_tricks_train_with_pk_batches(tiny_prepared, tmp_path):
    opts = tiny_options(
        tiny_prepared, tmp_path, total_epoch=2, save_every=2, warm_epoch=1, erasing_p=0.5, label_smoothing=0.1,
        stride=1, bnneck=True, triplet_weight=1.0, instances=2,
    )  # fmt: skip
    history = train(opts, quiet=True)
    assert history["skipped"] == [0, 0]  # P x K batches are always full
    assert all(math.isfinite(loss) for loss in history["train_loss"])
    assert yaml.safe_load((tmp_path / "tiny" / "opts.yaml").read_text())["bnneck"] is True


def test_more_identities_per_batch_than_the_data_has_is_said_in_the_options_words(tiny_prepared, tmp_path, capsys):
    """It said ``p=10 identities per batch, but the labels hold only 8 identities``: the sampler's words, no fix."""
    args = ["--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--gpu_ids", "", "--height", "32",
            "--width", "16", "--triplet_weight", "1", "--instances", "4", "--batchsize", "40"]  # fmt: skip
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train: error: --batchsize 40 with --instances 4 asks for 10 identities per batch")
    fits = int(re.search(r"use --batchsize (\d+) or less", error)[1])
    assert fits == 8 * 4 and not (tmp_path / "ft_ResNet50").exists()


def test_triplet_needs_several_images_per_identity(tiny_prepared, tmp_path):
    with pytest.raises(TrainError, match="--instances"):
        train(tiny_options(tiny_prepared, tmp_path, triplet_weight=1.0, instances=1), quiet=True)


def test_fast_data_path_trains_and_resumes_exactly(tiny_prepared, tmp_path, monkeypatch):
    """The cached-tensor data path: same loop, learns, and resumes to the same weights."""
    fast = dict(fast_data=True, channels_last=True, total_epoch=2, save_every=1)
    reference = train(tiny_options(tiny_prepared, tmp_path / "a", **fast), quiet=True)
    assert reference["train_loss"][-1] < reference["train_loss"][0]
    real_save = train_module.save_checkpoint

    def save_then_die(obj, path, **kwargs):
        real_save(obj, path, **kwargs)
        if path.name == "net_001.pth":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_options(tiny_prepared, tmp_path / "b", **fast), quiet=True)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(tiny_options(tiny_prepared, tmp_path / "b", **fast), resume=True, quiet=True)
    expected = torch.load(tmp_path / "a" / "tiny" / "net_last.pth", weights_only=False)["model"]
    resumed = torch.load(tmp_path / "b" / "tiny" / "net_last.pth", weights_only=False)["model"]
    for key, value in expected.items():
        assert torch.allclose(resumed[key].float(), value.float(), atol=1e-6), key


def test_overwrite_clears_everything_an_earlier_run_left(tiny_prepared, tmp_path):
    train(tiny_options(tiny_prepared, tmp_path, total_epoch=2, save_every=1), quiet=True)
    (tmp_path / "tiny" / "features.pt").write_bytes(b"old features")  # as python -m reid_utils.test leaves them
    train(tiny_options(tiny_prepared, tmp_path, total_epoch=1, save_every=1), overwrite=True, quiet=True)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir() if p.name != ".lock") == [
        "net_001.pth",
        "net_last.pth",
        "opts.yaml",
        "train.jpg",
    ]


def test_bf16_autocasts_on_a_cpu_that_computes_bfloat16(tiny_prepared, tmp_path, monkeypatch, capsys):
    """At 32x16, where layer4's maps are one pixel wide: bfloat16 was refused there (oneDNN's wrong weight
    gradients); now those convolutions run in float32 and the rest in bfloat16."""
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: True)  # any CPU can run it; some do it natively
    fp32 = train(tiny_options(tiny_prepared, tmp_path / "fp32", total_epoch=2, save_every=2), quiet=True)
    bf16 = train(tiny_options(tiny_prepared, tmp_path / "bf16", total_epoch=2, save_every=2, bf16=True))
    assert "float32 instead" not in capsys.readouterr().out  # no notice: the check at the start agreed
    assert bf16["train_loss"] != fp32["train_loss"]  # the arithmetic changed: the model ran in bfloat16
    for ours, exact in zip(bf16["train_loss"], fp32["train_loss"], strict=True):
        assert math.isclose(ours, exact, rel_tol=0.02)  # the same run otherwise (0.02 % apart on our CPU)
    # a CPU without bfloat16: float32 arithmetic, but opts.yaml keeps the request for a resume elsewhere
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: False)
    fallback = train(tiny_options(tiny_prepared, tmp_path / "fb", total_epoch=2, save_every=2, bf16=True), quiet=True)
    assert fallback["train_loss"] == fp32["train_loss"]
    assert yaml.safe_load((tmp_path / "fb" / "tiny" / "opts.yaml").read_text())["bf16"] is True


def test_bf16_is_refused_where_the_check_at_the_start_disagrees(tiny_prepared, tmp_path, monkeypatch, capsys):
    """A CPU whose bfloat16 step is off (here: said to be 50x off): one line, and the float32 run."""
    monkeypatch.setattr(speed_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(speed_module, "bf16_step_error", lambda model, size: 50.0)
    fp32 = train(tiny_options(tiny_prepared, tmp_path / "fp32", total_epoch=1, save_every=1), quiet=True)
    refused = train(tiny_options(tiny_prepared, tmp_path / "bf16", total_epoch=1, save_every=1, bf16=True))
    notices = [line for line in capsys.readouterr().out.splitlines() if "bfloat16" in line]
    assert notices == [
        "bfloat16 on this CPU does not compute what float32 does (a test step's gradients were up to 50x off, "
        "allowed 4x): training in float32 instead."
    ]
    assert refused["train_loss"] == fp32["train_loss"]


def test_fast_data_on_the_cpu_reuses_freed_memory(tiny_prepared, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "reuse_freed_memory", lambda: calls.append(1) or True)
    train(tiny_options(tiny_prepared, tmp_path / "classic", total_epoch=1, save_every=1), quiet=True)
    assert calls == []  # the classic path leaves the allocator alone
    train(tiny_options(tiny_prepared, tmp_path / "fast", total_epoch=1, save_every=1, fast_data=True), quiet=True)
    assert calls == [1]


def test_resume_is_exact_with_dataloader_workers_and_workers_change_nothing(tiny_prepared, tmp_path):
    """What a 4- or 8-core laptop does: worker processes load and augment the images.

    Each image's random crop, flip and erasing are seeded by (seed, epoch, image), not by the worker that
    loads it, and starting the workers draws nothing from the generator dropout uses: so the run with two
    workers is the run without any, and resuming it with workers from the epoch-1 checkpoint ends with
    exactly the same weights.
    """
    changes = dict(total_epoch=2, save_every=1, erasing_p=0.5, color_jitter=True)
    train(tiny_options(tiny_prepared, tmp_path / "workers", num_workers=2, **changes), quiet=True)
    train(tiny_options(tiny_prepared, tmp_path / "none", num_workers=0, **changes), quiet=True)
    with_workers = torch.load(tmp_path / "workers" / "tiny" / "net_last.pth", weights_only=False)
    without = torch.load(tmp_path / "none" / "tiny" / "net_last.pth", weights_only=False)
    assert with_workers["history"]["train_loss"] == without["history"]["train_loss"]
    for key, value in without["model"].items():
        assert torch.equal(with_workers["model"][key], value), key

    for later in ("net_002.pth", "net_last.pth"):  # the run died after epoch 1
        (tmp_path / "workers" / "tiny" / later).unlink()
    train(tiny_options(tiny_prepared, tmp_path / "workers", num_workers=2, **changes), resume=True, quiet=True)
    resumed = torch.load(tmp_path / "workers" / "tiny" / "net_last.pth", weights_only=False)
    assert resumed["history"]["train_loss"] == with_workers["history"]["train_loss"]
    for key, value in with_workers["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_a_compiled_run_saves_the_plain_networks_weights_and_can_be_evaluated_and_resumed(
    tiny_prepared, tmp_path, monkeypatch
):
    from reid_utils.test import load_trained_model

    real_compile = torch.compile
    compiled = []

    def compile_quickly(model, **kwargs):  # the same wrapper (and its "_orig_mod." keys), no minutes of inductor
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_quickly)
    opts = tiny_options(tiny_prepared, tmp_path, total_epoch=2, save_every=1, compile=True)
    train(opts, quiet=True)
    assert compiled  # the run did compile its model
    saved = torch.load(tmp_path / "tiny" / "net_001.pth", weights_only=False)["model"]
    assert not [key for key in saved if "_orig_mod" in key]
    model, _ = load_trained_model(tmp_path / "tiny")  # evaluation rebuilds the plain network: it fits
    assert torch.equal(model.state_dict()["head.classifier.weight"], torch.load(
        tmp_path / "tiny" / "net_last.pth", weights_only=False)["model"]["head.classifier.weight"])  # fmt: skip
    (tmp_path / "tiny" / "net_002.pth").unlink()
    (tmp_path / "tiny" / "net_last.pth").unlink()
    history = train(tiny_options(tiny_prepared, tmp_path, total_epoch=2, save_every=1, compile=True), resume=True,
                    quiet=True)  # fmt: skip
    assert len(history["train_loss"]) == 2


def test_pk_batches_must_not_split_an_identity(tiny_prepared, tmp_path):
    with pytest.raises(TrainError, match="not a multiple of --instances 4"):
        train(tiny_options(tiny_prepared, tmp_path, batchsize=10, triplet_weight=1.0, instances=4), quiet=True)
    assert not (tmp_path / "tiny").exists()


def test_warm_up_lasts_warm_epoch_epochs_of_this_process_steps(tiny_prepared, tmp_path):
    train(tiny_options(tiny_prepared, tmp_path, total_epoch=1, save_every=1, warm_epoch=1), quiet=True)
    factor = torch.load(tmp_path / "tiny" / "net_001.pth", weights_only=False)["state"]["warm_up"]
    assert factor == pytest.approx(1.0, abs=1e-9)  # 0.1 -> 1 over the steps of one epoch, not more


def test_fast_data_names_an_unreadable_image_and_honours_skip_corrupt(tiny_prepared, tmp_path, capsys):
    import shutil

    data = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, data)
    victim = sorted((data / "train").rglob("*.jpg"))[2]
    content = victim.read_bytes()
    victim.unlink()  # a hard link: write a new file instead of cutting the shared one
    victim.write_bytes(content[:200])
    args = ["--data_dir", str(data), "--model_dir", str(tmp_path / "model"), "--backbone", "resnet18", "--height",
            "32", "--width", "16", "--batchsize", "8", "--no_pretrained", "--gpu_ids", "", "--total_epoch", "1",
            "--fast_data"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train: error:") and victim.name in err and "--skip_corrupt" in err
    assert main([*args, "--skip_corrupt", "--num_workers", "2"]) == 0
    assert f"Skipped 1 unreadable image(s) in {data / 'train'}: {victim.name}" in capsys.readouterr().out


def test_the_progress_bar_ends_at_its_total(tiny_prepared, tmp_path, monkeypatch):
    """A bar that stops short turns red in Jupyter: the skipped short batches and a P x K epoch's own count are
    counted, so a normal run ends at 100 %, resumed or not."""
    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, images):
            self.n += images

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_module, "tqdm", Recorder)
    train(tiny_options(tiny_prepared, tmp_path / "plain", total_epoch=2, save_every=1))  # not quiet: with a bar
    train(tiny_options(tiny_prepared, tmp_path / "pk", total_epoch=2, save_every=1, triplet_weight=1.0, instances=2))
    (tmp_path / "plain" / "tiny" / "net_last.pth").unlink()
    (tmp_path / "plain" / "tiny" / "net_002.pth").unlink()
    train(tiny_options(tiny_prepared, tmp_path / "plain", total_epoch=2, save_every=1), resume=True)
    assert len(bars) == 3 and all(bar.n == bar.total > 0 for bar in bars), [(bar.n, bar.total) for bar in bars]


def test_a_watched_run_redraws_its_one_figure_after_every_epoch(tiny_prepared, tmp_path, monkeypatch):
    """The live curve lives (issue #21): redrawn in place after every epoch, as layumi's train.py draws it, while the
    checkpoints keep their schedule; a quiet run draws only with its checkpoints (see finished_run: 2 of 4)."""
    import IPython.display

    import reid_utils.visualize as visualize_module

    shown = []

    class Handle:
        def update(self, fig):
            shown.append("update")

    def display(fig, display_id=False):
        assert display_id is True  # a handle to redraw in place, not a new figure per epoch
        shown.append("display")
        return Handle()

    monkeypatch.setattr(visualize_module, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", display)
    history = train(tiny_options(tiny_prepared, tmp_path, total_epoch=3, save_every=10))  # not quiet: watched
    assert history["curve_updates"] == 3 and shown == ["display", "update", "update"]
    assert sorted(p.name for p in (tmp_path / "tiny").glob("*.pth")) == ["net_last.pth"]
    assert (tmp_path / "tiny" / "train.jpg").stat().st_size > 1000
