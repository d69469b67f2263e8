"""Feature extraction, rebuilding a trained run, and the ``python -m reid_utils.test`` command line."""

import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from reid_utils.data import ClassicData, parse_market_name
from reid_utils.test import (
    FeatureSet,
    evaluate_features,
    evaluate_run,
    evaluation_loader,
    extract_features,
    load_trained_model,
    main,
)
from reid_utils.train import TrainError, TrainOptions, train

HEIGHT, WIDTH = 32, 16


@pytest.fixture(scope="module")
def trained_run(tiny_prepared, tmp_path_factory):
    """One tiny resnet18 trained for a single epoch: the run every test here evaluates."""
    model_dir = tmp_path_factory.mktemp("eval-model")
    opts = TrainOptions(
        name="tiny", data_dir=str(tiny_prepared), model_dir=str(model_dir), gpu_ids="", backbone="resnet18",
        height=HEIGHT, width=WIDTH, batchsize=16, total_epoch=1, save_every=10, pretrained=False, lr=0.002,
    )  # fmt: skip
    train(opts, quiet=True)
    return model_dir / "tiny"


@pytest.fixture(scope="module")
def model(trained_run):
    net, _ = load_trained_model(trained_run)
    return net


def loader(prepared, split, batch_size=8):
    return evaluation_loader(prepared / split, HEIGHT, WIDTH, batch_size=batch_size, backend=ClassicData(0))


@pytest.fixture(scope="module")
def feature_sets(model, tiny_prepared):
    return {split: extract_features(model, loader(tiny_prepared, split)) for split in ("query", "gallery")}


# --------------------------------------------------------------------------- extract_features


@pytest.mark.parametrize("split", ["query", "gallery"])
def test_one_unit_length_512_d_row_per_image(feature_sets, tiny_prepared, split):
    fs = feature_sets[split]
    n_images = sum(1 for _ in (tiny_prepared / split).rglob("*.jpg"))
    assert n_images > 0
    assert fs.features.shape == (n_images, 512)
    assert fs.features.dtype == torch.float32
    assert len(fs.paths) == len(fs.pids) == len(fs.cams) == n_images
    torch.testing.assert_close(fs.features.norm(dim=1), torch.ones(n_images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", ["query", "gallery"])
def test_pids_and_cameras_follow_the_file_names(feature_sets, tiny_prepared, split):
    fs = feature_sets[split]
    assert fs.paths == [path for path, _ in loader(tiny_prepared, split).dataset.samples]  # loader order
    names = [parse_market_name(p) for p in fs.paths]
    np.testing.assert_array_equal(fs.pids, [n.pid for n in names])
    np.testing.assert_array_equal(fs.cams, [n.camera for n in names])
    # prepare_market files every image under a folder named after its pid
    assert [int(p.split("/")[-2]) for p in fs.paths] == fs.pids.tolist()


def test_gallery_keeps_junk_and_distractors(feature_sets):
    gallery, query = feature_sets["gallery"], feature_sets["query"]
    assert {-1, 0} <= set(gallery.pids.tolist())
    assert set(query.pids.tolist()) <= set(gallery.pids.tolist()) - {-1, 0}


def test_flip_adds_the_mirror_embedding_then_normalises(model, feature_sets, tiny_prepared):
    images, _ = next(iter(loader(tiny_prepared, "query")))
    assert len(images) == 8 < len(feature_sets["query"].paths)  # the first of several batches
    with torch.no_grad():
        expected = nn.functional.normalize(model.embed(images) + model.embed(images.flip(dims=[3])), dim=1)
    torch.testing.assert_close(feature_sets["query"].features[:8], expected, atol=1e-5, rtol=1e-4)


def test_without_flip_only_the_image_itself_counts(model, feature_sets, tiny_prepared):
    plain = extract_features(model, loader(tiny_prepared, "query"), flip=False)
    images, _ = next(iter(loader(tiny_prepared, "query")))
    with torch.no_grad():
        expected = nn.functional.normalize(model.embed(images), dim=1)
    torch.testing.assert_close(plain.features[:8], expected, atol=1e-5, rtol=1e-4)
    assert plain.features.shape == feature_sets["query"].features.shape
    assert not torch.allclose(plain.features, feature_sets["query"].features, atol=1e-3)


def test_data_parallel_wrapper_gives_the_same_features(model, feature_sets, tiny_prepared):
    wrapped = extract_features(nn.DataParallel(model), loader(tiny_prepared, "query"))
    torch.testing.assert_close(wrapped.features, feature_sets["query"].features)
    np.testing.assert_array_equal(wrapped.pids, feature_sets["query"].pids)


def test_missing_split_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        evaluation_loader(tmp_path / "query", HEIGHT, WIDTH)


# --------------------------------------------------------------------------- load_trained_model


def test_rebuilds_the_trained_network_with_its_weights(trained_run):
    model, opts = load_trained_model(trained_run)
    assert not model.training
    assert (opts.backbone, opts.height, opts.width, opts.num_classes) == ("resnet18", HEIGHT, WIDTH, 8)
    saved = torch.load(trained_run / "net_last.pth", map_location="cpu", weights_only=False)["model"]
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_evaluating_a_run_gives_figures_between_0_and_1(trained_run, tiny_prepared):
    """What notebook 06's ablation reads for each of its fifteen models."""
    result = evaluate_run(trained_run, tiny_prepared)
    assert 0 < result.mAP <= 1 and 0 <= result.rank(1) <= 1 and result.num_queries_evaluated > 0


def test_unknown_run_mentions_name(tmp_path):
    with pytest.raises(TrainError, match="--name"):
        load_trained_model(tmp_path / "no-such-run")


def test_run_without_checkpoint(trained_run, tmp_path):
    run = tmp_path / "tiny"
    run.mkdir()
    shutil.copy(trained_run / "opts.yaml", run / "opts.yaml")
    with pytest.raises(TrainError, match="no checkpoint"):
        load_trained_model(run)


def test_checkpoint_of_another_class_count_is_a_train_error(trained_run, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(trained_run, run)
    opts = yaml.safe_load((run / "opts.yaml").read_text())
    assert opts["num_classes"] == 8
    opts["num_classes"] = 5
    (run / "opts.yaml").write_text(yaml.safe_dump(opts))
    with pytest.raises(TrainError, match="mixes two runs"):  # the checkpoint's own options say so
        load_trained_model(run)
    checkpoint = torch.load(run / "net_last.pth", weights_only=False)
    del checkpoint["options"]  # a checkpoint that does not say: its weights do not fit
    torch.save(checkpoint, run / "net_last.pth")
    with pytest.raises(TrainError, match="does not fit"):
        load_trained_model(run)


# --------------------------------------------------------------------------- the command line


def test_cli_evaluates_and_saves_features(trained_run, tiny_prepared, model, capsys):
    argv = ["--name", "tiny", "--data_dir", str(tiny_prepared), "--model_dir", str(trained_run.parent)]
    assert main([*argv, "--gpu_ids", "", "--batchsize", "16"]) == 0
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if "Rank@1" in line and "mAP" in line]
    assert len(summary) == 1
    saved = torch.load(trained_run / "features.pt", weights_only=False)
    assert set(saved) == {"query", "gallery"}
    assert not list(trained_run.glob("*tmp*"))  # .features.pt.tmp renamed away
    for split in ("query", "gallery"):
        expected = extract_features(model, loader(tiny_prepared, split))
        torch.testing.assert_close(saved[split]["features"], expected.features, atol=1e-5, rtol=1e-4)
        np.testing.assert_array_equal(saved[split]["pids"], expected.pids)
        np.testing.assert_array_equal(saved[split]["cams"], expected.cams)
        assert saved[split]["paths"] == expected.paths

    # the printed numbers are those of the saved features
    result = evaluate_features(FeatureSet(**saved["query"]), FeatureSet(**saved["gallery"]))
    printed_map = float(re.search(r"mAP: ([\d.]+)%", summary[0]).group(1))
    printed_r1 = float(re.search(r"Rank@1: ([\d.]+)%", summary[0]).group(1))
    assert printed_map == pytest.approx(100 * result.mAP, abs=0.006)
    assert printed_r1 == pytest.approx(100 * result.rank(1), abs=0.006)


def _assert_one_line_error(code, capsys):
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("test: error:")
    assert len(err.splitlines()) == 1
    assert "Traceback" not in captured.err + captured.out
    return err


def test_cli_unknown_name_exits_2(tiny_prepared, tmp_path, capsys):
    code = main(["--name", "nope", "--data_dir", str(tiny_prepared), "--model_dir", str(tmp_path), "--gpu_ids", ""])
    err = _assert_one_line_error(code, capsys)
    assert "--name" in err
    assert not (tmp_path / "nope").exists()


def test_cli_data_dir_without_query_exits_2(trained_run, tmp_path, capsys):
    argv = ["--name", "tiny", "--data_dir", str(tmp_path), "--model_dir", str(trained_run.parent), "--gpu_ids", ""]
    err = _assert_one_line_error(main(argv), capsys)
    assert "query" in err


def test_cli_fast_data_extracts_the_same_features(trained_run, tiny_prepared, tmp_path, capsys):
    """``--fast_data`` decodes each image once and normalises whole batches: the very same input tensors, so the
    very same features and numbers as the classic DataLoader."""
    features = {}
    for path, extra in (("classic", []), ("fast", ["--fast_data"])):
        copy = tmp_path / path / "tiny"
        shutil.copytree(trained_run, copy)
        argv = ["--name", "tiny", "--data_dir", str(tiny_prepared), "--model_dir", str(copy.parent), "--gpu_ids", ""]
        assert main([*argv, *extra]) == 0
        features[path] = torch.load(copy / "features.pt", weights_only=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Rank@1")]
    assert len(lines) == 2 and lines[0] == lines[1]
    for split in ("query", "gallery"):
        assert torch.equal(features["fast"][split]["features"], features["classic"][split]["features"])
        assert features["fast"][split]["paths"] == features["classic"][split]["paths"]
