import multiprocessing
import shutil
import time
from collections import Counter

import pytest

from reid_utils.data import parse_market_name
from reid_utils.files import one_at_a_time
from reid_utils.prepare import MARKER, PrepareError, main, prepare_market


def tree(root):
    """Every file of a prepared tree with its bytes, for comparing two trees."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(tiny_market, tiny_prepared):
    train_src = sorted((tiny_market / "bounding_box_train").glob("*.jpg"))
    assert {p.name for p in tiny_prepared.iterdir()} == {
        "train",
        "val",
        "train_all",
        "query",
        "gallery",
        MARKER,
    }
    assert len(list((tiny_prepared / "train_all").rglob("*.jpg"))) == len(train_src)
    per_pid = Counter(f"{parse_market_name(p).pid:04d}" for p in train_src)
    # val: exactly one image per identity; train: the rest
    for pid, n in per_pid.items():
        assert len(list((tiny_prepared / "val" / pid).iterdir())) == 1
        assert len(list((tiny_prepared / "train" / pid).iterdir())) == n - 1
    gallery = {p.name for p in (tiny_prepared / "gallery").rglob("*.jpg")}
    assert gallery == {p.name for p in (tiny_market / "bounding_box_test").glob("*.jpg")}
    assert (tiny_prepared / "gallery" / "-1").is_dir() and (tiny_prepared / "gallery" / "0000").is_dir()
    for image in (tiny_prepared / "query").rglob("*.jpg"):
        assert image.parent.name == f"{parse_market_name(image).pid:04d}"  # every image in its pid's folder


def test_val_is_the_first_image_by_sorted_name(tiny_market, tiny_prepared):
    for folder in (tiny_prepared / "val").iterdir():
        (only,) = list(folder.iterdir())
        first = sorted(p.name for p in (tiny_market / "bounding_box_train").glob(f"{folder.name}_*.jpg"))[0]
        assert only.name == first


def test_second_run_is_a_no_op_with_an_identical_tree(tiny_market, tmp_path):
    first = prepare_market(tiny_market, tmp_path / "p", quiet=True)
    before = tree(first.root)
    again = prepare_market(tiny_market, tmp_path / "p", quiet=True)
    assert again.reused and tree(again.root) == before
    copied = prepare_market(tiny_market, tmp_path / "q", link="copy", quiet=True)
    assert {k: v for k, v in tree(copied.root).items() if k != MARKER} == {
        k: v for k, v in before.items() if k != MARKER
    }


def test_multi_query_from_gt_bbox(tiny_market, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_market, src)
    (src / "gt_bbox").mkdir()
    for image in sorted((src / "query").glob("*.jpg"))[:3]:
        shutil.copy(image, src / "gt_bbox" / image.name)
    summary = prepare_market(src, tmp_path / "p", quiet=True)
    assert summary.counts["multi-query"] == 3


def test_interrupted_run_leaves_no_complete_looking_tree(tiny_market, tmp_path, monkeypatch):
    import reid_utils.prepare as prepare

    calls = {"n": 0}
    real_place = prepare._place

    def failing_place(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_place(*args)

    monkeypatch.setattr(prepare, "_place", failing_place)
    with pytest.raises(KeyboardInterrupt):
        prepare_market(tiny_market, tmp_path / "p", quiet=True)
    assert list(tmp_path.iterdir()) == []  # neither the tree nor its temporary folder is left
    monkeypatch.setattr(prepare, "_place", real_place)
    assert not prepare_market(tiny_market, tmp_path / "p", quiet=True).reused


@pytest.mark.parametrize("layout", ["missing", "empty", "not_market", "bad_name"])
def test_bad_source_gives_one_message_and_exit_2(layout, tiny_market, tmp_path, capsys):
    src = tmp_path / "src"
    if layout == "empty":
        src.mkdir()
    elif layout == "not_market":
        (src / "cats").mkdir(parents=True)
    elif layout == "bad_name":
        shutil.copytree(tiny_market, src)
        (src / "query" / "holiday.jpg").write_bytes(b"x")
    assert main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error:") and "Traceback" not in err
    assert ("holiday.jpg" in err) if layout == "bad_name" else ("--src" in err)
    assert not (tmp_path / "out").exists()


def test_refuses_to_fill_a_foreign_folder(tiny_market, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not a prepared folder"):
        prepare_market(tiny_market, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_cli_prints_counts(tiny_market, tmp_path, capsys):
    assert main(["--src", str(tiny_market), "--dst", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "train_all" in out and "gallery" in out


def test_says_how_it_placed_the_files_in_plain_words(tiny_market, tmp_path, capsys):
    from reid_utils.prepare import prepare_market

    prepare_market(tiny_market, tmp_path / "copied", link="copy")
    prepare_market(tiny_market, tmp_path / "linked", link="symlink")
    out = capsys.readouterr().out
    assert "(copies)." in out and "(symbolic links)." in out and "copys" not in out


def test_an_empty_image_is_refused_and_named(tiny_market, tmp_path, capsys):
    import shutil

    from reid_utils.prepare import main

    source = tmp_path / "Market"
    shutil.copytree(tiny_market, source)
    victim = sorted((source / "query").glob("*.jpg"))[2]
    victim.write_bytes(b"")  # an unzip that stopped early
    assert main(["--src", str(source), "--dst", str(tmp_path / "prepared")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error:") and victim.name in err and "0 bytes" in err
    assert not (tmp_path / "prepared").exists()


def _prepare_and_report(src, dst, queue) -> None:
    queue.put(prepare_market(src, dst, quiet=True).reused)


def test_a_second_process_preparing_the_same_tree_waits_and_reuses_it(tiny_market, tmp_path):
    """Two notebooks started at once on a fresh clone: one builds the tree, the other waits and reuses it."""
    dst = tmp_path / "prepared"
    context = multiprocessing.get_context("fork")  # the child only moves files: no torch threads involved
    queue = context.Queue()
    with one_at_a_time(dst):  # this process is the one preparing
        child = context.Process(target=_prepare_and_report, args=(tiny_market, dst, queue))
        child.start()
        time.sleep(1.0)
        assert child.is_alive() and not dst.exists()  # it waits instead of drawing a second tree
        assert not prepare_market(tiny_market, dst, quiet=True).reused  # nested in this process: no deadlock
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) is True  # it found the tree built, and reused it
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no lock file or temporary left behind


def test_the_tree_is_on_the_disk_before_it_takes_its_name(tiny_market, tmp_path, monkeypatch):
    """Renamed into place before its files reach the disk, a power cut could leave a complete-looking tree of
    empty files. (One sync for the whole folder: cheaper than an fsync per image.)"""
    import os

    events = []
    real_sync, real_rename = os.sync, os.rename
    monkeypatch.setattr(os, "sync", lambda: events.append("sync") or real_sync())
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    prepare_market(tiny_market, tmp_path / "prepared", quiet=True)
    assert events.index("sync") < events.index(("rename", str(tmp_path / "prepared")))
