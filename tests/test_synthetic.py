"""Tests for the synthetic Market-1501 generator: layout, naming, splits, determinism, atomicity, CLI."""

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_utils import synthetic
from reid_utils.synthetic import SUMMARY_FILE, SyntheticSummary, generate_market, main, read_summary

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SPLITS = ("bounding_box_train", "bounding_box_test", "query")
SMALL = {"train_ids": 6, "test_ids": 6}


def parse(path: Path) -> tuple[int, int, int, int]:
    """(pid, camera, sequence, frame) of a Market file name; fails the test on a bad name."""
    match = MARKET_NAME.match(path.name)
    assert match, f"not a Market-1501 name: {path.name}"
    return int(match[1]), int(match[2]), int(match[3]), int(match[4])


def files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).iterdir())


def decoded(root: Path) -> dict[str, np.ndarray]:
    return {f"{s}/{p.name}": np.asarray(Image.open(p)) for s in SPLITS for p in files(root, s)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSummary]:
    root = tmp_path_factory.mktemp("synthetic") / "market"
    return root, generate_market(root, seed=3, **SMALL)


def test_names_and_images_follow_market_format(generated: tuple[Path, SyntheticSummary]) -> None:
    root, _ = generated
    assert sorted(p.name for p in root.iterdir()) == sorted([*SPLITS, SUMMARY_FILE])
    for split in SPLITS:
        assert files(root, split), f"{split} is empty"
        for path in files(root, split):
            _, camera, sequence, _ = parse(path)
            assert 1 <= camera <= 6 and 1 <= sequence <= 6
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 128)


def test_identities_are_split_and_structured_like_market(generated: tuple[Path, SyntheticSummary]) -> None:
    root, summary = generated
    train = [parse(p) for p in files(root, "bounding_box_train")]
    test = [parse(p) for s in ("bounding_box_test", "query") for p in files(root, s)]
    train_pids = {pid for pid, *_ in train}
    test_pids = {pid for pid, *_ in test} - {0, -1}
    assert not train_pids & {0, -1}, "train must hold only real identities"
    assert not train_pids & test_pids
    assert len(train_pids) == summary.train_ids and len(test_pids) == summary.test_ids
    assert all(1 <= pid <= 1501 for pid in train_pids | test_pids)

    for records in (train, [r for r in test if r[0] > 0]):
        images_per_camera: dict[int, dict[int, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
        for pid, camera, sequence, frame in records:
            images_per_camera[pid][camera].append((sequence, frame))
        for pid, cameras in images_per_camera.items():
            assert 2 <= len(cameras) <= 4, f"pid {pid} is seen by {len(cameras)} cameras"
            for shots in cameras.values():
                assert 2 <= len(shots) <= 4
                assert len({sequence for sequence, _ in shots}) == 1, "one sequence per camera"
                frames = [frame for _, frame in shots]
                assert max(frames) - min(frames) < 100, "frames of one walk should be close together"


def test_every_query_has_a_cross_camera_match_and_gallery_has_extras(
    generated: tuple[Path, SyntheticSummary],
) -> None:
    root, _ = generated
    gallery = [parse(p) for p in files(root, "bounding_box_test")]
    gallery_cameras: dict[int, set[int]] = defaultdict(set)
    for pid, camera, _, _ in gallery:
        gallery_cameras[pid].add(camera)
    queries = [parse(p) for p in files(root, "query")]
    assert {pid for pid, *_ in queries} <= set(gallery_cameras)
    query_cameras: dict[int, list[int]] = defaultdict(list)
    for pid, camera, _, _ in queries:
        assert pid > 0
        assert gallery_cameras[pid] - {camera}, f"query pid {pid} cam {camera} has no other-camera match"
        query_cameras[pid].append(camera)
    for cameras in query_cameras.values():
        assert len(cameras) == len(set(cameras)) <= 2, "at most one query per camera, two per identity"
    names = [p.name for p in files(root, "bounding_box_test")]
    assert any(n.startswith("0000_") for n in names)
    assert any(n.startswith("-1_") for n in names)


def test_summary_round_trips_and_matches_disk(generated: tuple[Path, SyntheticSummary]) -> None:
    root, summary = generated
    assert read_summary(root) == summary
    assert summary.counts == {split: len(files(root, split)) for split in SPLITS}
    assert (summary.seed, summary.train_ids, summary.test_ids) == (3, 6, 6)


def test_read_summary_rejects_missing_or_broken_files(tmp_path: Path) -> None:
    assert read_summary(tmp_path) is None
    (tmp_path / SUMMARY_FILE).write_text("{not json")
    assert read_summary(tmp_path) is None
    (tmp_path / SUMMARY_FILE).write_text('{"format_version": 1, "seed": 0}')
    assert read_summary(tmp_path) is None


def test_same_seed_same_pixels_other_seed_other_set(generated: tuple[Path, SyntheticSummary], tmp_path: Path) -> None:
    root, _ = generated
    again = tmp_path / "again"
    generate_market(again, seed=3, **SMALL)
    first, second = decoded(root), decoded(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert (root / SUMMARY_FILE).read_bytes() == (again / SUMMARY_FILE).read_bytes()

    other = decoded(generate_market(tmp_path / "other", seed=4, **SMALL).root)
    assert other.keys() != first.keys()


def test_existing_folder_needs_overwrite(generated: tuple[Path, SyntheticSummary], tmp_path: Path) -> None:
    root, _ = generated
    with pytest.raises(FileExistsError):
        generate_market(root, seed=3, **SMALL)
    assert read_summary(root) is not None, "a refused run must leave the old set intact"

    target = tmp_path / "replace_me"
    generate_market(target, seed=1, train_ids=2, test_ids=2)
    replaced = generate_market(target, seed=2, train_ids=2, test_ids=3, overwrite=True)
    assert read_summary(target) == replaced and replaced.seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replace_me"], "no temp or backup folder left"


def test_overwrite_refuses_a_folder_that_is_not_a_synthetic_set(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_market(precious, train_ids=2, test_ids=2, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_no_temp_folder_after_success_and_cleanup_after_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_market(tmp_path / "ok", train_ids=2, test_ids=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ok"]

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash while writing the summary")

    monkeypatch.setattr(synthetic, "_summary_payload", crash)
    with pytest.raises(RuntimeError):
        generate_market(tmp_path / "broken", train_ids=2, test_ids=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ok"], "a failed run must leave nothing behind"


def test_cli_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--seed", "5", "--train_ids", "2", "--test_ids", "2"]) == 0
    summary = read_summary(out)
    assert summary is not None and summary.seed == 5
    line = capsys.readouterr().out.strip()
    assert str(out) in line and f"{summary.counts['query']} query" in line


@pytest.mark.parametrize(
    ("extra_args", "expected_words"),
    [
        (["--train_ids", "1"], ["--train_ids", "at least 2"]),
        (["--test_ids", "0"], ["--test_ids", "at least 2"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
    ],
)
def test_cli_rejects_bad_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra_args: list[str], expected_words: list[str]
) -> None:
    assert main(["--out", str(tmp_path / "x"), *extra_args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert all(word in err for word in expected_words)
    assert not (tmp_path / "x").exists()


def test_cli_existing_folder_and_unwritable_path(
    generated: tuple[Path, SyntheticSummary], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = generated
    assert main(["--out", str(root), "--train_ids", "2", "--test_ids", "2"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["--out", str(a_file / "inside"), "--train_ids", "2", "--test_ids", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "--out" in err and "Traceback" not in err
