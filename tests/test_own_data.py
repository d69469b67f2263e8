"""Tests for importing your own crops into the Market-1501 layout: names, split, queries, errors, CLI."""

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from reid_utils.data import MARKET_FOLDERS, parse_market_name
from reid_utils.own_data import MARKER, CropImportError, ImportSummary, import_crops, main
from reid_utils.prepare import prepare_market

TRAIN, GALLERY, QUERY = "bounding_box_train", "bounding_box_test", "query"


def colour(pid, cam, index):
    """A distinct flat colour per crop, so a crop can be recognised after JPEG."""
    return (40 * pid % 256, 50 * cam + 20, 50 + 70 * index)


def write_crop(path, pid, cam, index, mode="RGB"):
    size = (24 + 4 * index + cam, 48 + 2 * pid)  # every crop its own size
    image = Image.new("RGB", size, colour(pid, cam, index))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return size


def make_crops(folder, pids=range(1, 7), cams=(1, 2), per_cam=2, cameras=True):
    """``len(pids)`` people x ``cams`` x ``per_cam`` crops; some PNG (one RGBA), plus a file to ignore."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for pid in pids:
        for cam in cams:
            for index in range(per_cam):
                ext = "png" if (pid + index) % 3 == 0 else "jpg"
                mode = "RGBA" if (pid, cam, index) == (3, 1, 0) else "RGB"
                stem = f"{pid}_c{cam}_frame{index:04d}" if cameras else f"{pid}_cam{cam}_frame{index:04d}"
                name = f"{stem}.{ext.upper() if pid == 2 else ext}"
                made[name] = (pid, cam, index, write_crop(folder / name, pid, cam, index, mode))
    (folder / "notes.txt").write_text("not a crop")
    return made


def outputs(root):
    """folder -> sorted output names."""
    return {folder: sorted(p.name for p in (root / folder).iterdir()) for folder in MARKET_FOLDERS}


def parsed(root):
    return {folder: [parse_market_name(name) for name in names] for folder, names in outputs(root).items()}


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


@pytest.fixture
def crops(tmp_path):
    src = tmp_path / "crops"
    return src, make_crops(src)


def test_layout_names_and_split(crops, tmp_path):
    src, made = crops
    summary = import_crops(src, tmp_path / "market")
    assert isinstance(summary, ImportSummary) and summary.root == tmp_path / "market"
    assert summary.cameras == "names"
    names = parsed(summary.root)  # every name parses as Market-1501
    assert {k: len(v) for k, v in names.items()} == summary.counts
    assert sum(summary.counts.values()) == len(made)  # every crop imported once, notes.txt ignored
    train_pids = {n.pid for n in names[TRAIN]}
    test_pids = {n.pid for n in names[QUERY]} | {n.pid for n in names[GALLERY]}
    assert train_pids and test_pids and not train_pids & test_pids
    assert train_pids | test_pids == set(range(1, 7))
    assert summary.identities == {"train": 3, "test": 3, "distractors": 0}
    assert len(train_pids) == 3 and {n.pid for n in names[QUERY]} == test_pids
    # names are unique across folders
    every = [name for names_ in outputs(summary.root).values() for name in names_]
    assert len(every) == len(set(every))
    assert json.loads((summary.root / MARKER).read_text())["counts"] == summary.counts


def test_every_query_has_a_match_in_another_camera(crops, tmp_path):
    src, _ = crops
    names = parsed(import_crops(src, tmp_path / "market").root)
    for query in names[QUERY]:
        assert any(g.pid == query.pid and g.camera != query.camera for g in names[GALLERY])
    # 2 cameras x 2 images: one query per camera and person
    assert len(names[QUERY]) == 2 * len({q.pid for q in names[QUERY]})


def test_queries_without_a_cross_camera_match_join_the_gallery(tmp_path):
    src = tmp_path / "crops"
    make_crops(src, pids=range(1, 5), cams=(1,), per_cam=2)
    for pid in range(1, 5):  # one crop per person from camera 2 and one from camera 3
        write_crop(src / f"{pid}_c2_a.jpg", pid, 2, 0)
        write_crop(src / f"{pid}_c3_a.jpg", pid, 3, 0)
    names = parsed(import_crops(src, tmp_path / "market", test_fraction=0.25).root)
    (pid,) = {q.pid for q in names[QUERY]}
    # camera 1 has a second image in the gallery, so queries from cameras 2 and 3 keep a match there;
    # the first image of camera 1 needs a gallery image from camera 2 or 3, but both are queries
    assert sorted(q.camera for q in names[QUERY]) == [2, 3]
    assert sorted(g.camera for g in names[GALLERY] if g.pid == pid) == [1, 1]
    # two cameras with one crop each: only one of them can be a query
    src2 = tmp_path / "crops2"
    make_crops(src2, pids=range(1, 4), cams=(1, 2), per_cam=1)
    names = parsed(import_crops(src2, tmp_path / "market2", test_fraction=0.3).root)
    assert len(names[QUERY]) == 1 and len(names[GALLERY]) == 1
    assert names[QUERY][0].pid == names[GALLERY][0].pid and names[QUERY][0].camera != names[GALLERY][0].camera


def test_pixels_sizes_and_frame_order_are_kept(crops, tmp_path):
    src, made = crops
    root = import_crops(src, tmp_path / "market").root
    # frame k of (pid, cam) is the k-th crop of that person and camera by sorted source name
    sources = defaultdict(list)
    for name in sorted(made):
        pid, cam, index, size = made[name]
        sources[pid, cam].append((index, size))
    checked = 0
    for folder in MARKET_FOLDERS:
        for path in (root / folder).iterdir():
            name = parse_market_name(path)
            index, size = sources[name.pid, name.camera][name.frame - 1]
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == size
                pixels = np.asarray(image, dtype=float)
            assert np.abs(pixels - colour(name.pid, name.camera, index)).mean() < 3
            checked += 1
    assert checked == len(made)
    files = json.loads((root / MARKER).read_text())["files"]
    assert sorted(files.values()) == sorted(made)


def test_same_seed_same_names_other_seed_other_split(crops, tmp_path):
    src, _ = crops
    first = outputs(import_crops(src, tmp_path / "a", seed=7).root)
    assert outputs(import_crops(src, tmp_path / "b", seed=7).root) == first
    splits = {tuple(outputs(import_crops(src, tmp_path / f"s{s}", seed=s).root)[TRAIN]) for s in range(4)}
    assert len(splits) > 1


def test_test_fraction_keeps_one_identity_on_each_side(crops, tmp_path):
    src, _ = crops
    low = import_crops(src, tmp_path / "low", test_fraction=0.01)
    high = import_crops(src, tmp_path / "high", test_fraction=0.99)
    assert low.identities["test"] == 1 and low.identities["train"] == 5
    assert high.identities["test"] == 5 and high.identities["train"] == 1


def test_single_image_and_single_camera_identities(crops, tmp_path):
    src, made = crops
    write_crop(src / "50_c1_only.jpg", 50, 1, 0)  # one image: a gallery distractor
    for index in range(3):  # one camera only: can't be queried, so it trains
        write_crop(src / f"60_c4_{index}.jpg", 60, 4, index)
    summary = import_crops(src, tmp_path / "market", test_fraction=0.99)
    names = parsed(summary.root)
    assert summary.identities["distractors"] == 1
    assert [n.pid for n in names[GALLERY]].count(50) == 1 and 50 not in {n.pid for n in names[QUERY] + names[TRAIN]}
    assert {n.pid for n in names[TRAIN]} == {60}
    assert sum(summary.counts.values()) == len(made) + 4


def test_prepare_accepts_the_imported_folder(crops, tmp_path):
    src, _ = crops
    write_crop(src / "50_c1_only.jpg", 50, 1, 0)
    summary = import_crops(src, tmp_path / "market")
    prepared = prepare_market(summary.root, tmp_path / "prepared", quiet=True)
    assert prepared.counts["query"] == summary.counts[QUERY]
    assert prepared.counts["gallery"] == summary.counts[GALLERY]
    assert prepared.counts["train_all"] == summary.counts[TRAIN]
    # training refuses train/ and val/ with different identities
    folders = {sub: sorted(p.name for p in (prepared.root / sub).iterdir()) for sub in ("train", "val")}
    assert folders["train"] == folders["val"] and len(folders["train"]) == summary.identities["train"]


def test_without_cameras_uses_pseudo_cameras(tmp_path):
    src = tmp_path / "crops"
    made = make_crops(src, pids=range(1, 5), cams=(1, 2, 3, 4), per_cam=2, cameras=False)  # 8 crops a person
    with pytest.raises(CropImportError, match="--no_cameras"):
        import_crops(src, tmp_path / "market")
    summary = import_crops(src, tmp_path / "market", cameras="none")
    assert summary.cameras == "none"
    names = parsed(summary.root)
    assert sum(summary.counts.values()) == len(made)
    for pid in range(1, 5):
        cams = [n.camera for folder in MARKET_FOLDERS for n in names[folder] if n.pid == pid]
        # 8 images by sorted name: pseudo-cameras 1..6, then 1, 2 again
        assert sorted(cams) == [1, 1, 2, 2, 3, 4, 5, 6]
    assert len(names[QUERY]) == summary.identities["test"] == 2  # one query per test identity
    for query in names[QUERY]:
        assert query.camera == 1
        matches = [g for g in names[GALLERY] if g.pid == query.pid and g.camera != query.camera]
        assert len(matches) == 6  # everything but the query and the other pseudo-camera 1 image


def test_overwrite_replaces_only_an_import(crops, tmp_path):
    src, _ = crops
    dst = tmp_path / "market"
    import_crops(src, dst, seed=1)
    with pytest.raises(CropImportError, match="already exists"):
        import_crops(src, dst)
    again = import_crops(src, dst, seed=2, overwrite=True)
    assert json.loads((again.root / MARKER).read_text())["seed"] == 2
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(CropImportError, match="not made by this importer"):
        import_crops(src, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path, "market") == [] and leftovers(tmp_path, "mine") == []


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, tmp_path, dst, *args, expect=()):
    code, out, err = run_main(capsys, "--dst", dst, *args)
    assert code == 2 and err.startswith("own_data: error: ") and "Traceback" not in err
    for text in expect:
        assert text in err
    assert not dst.exists() and leftovers(dst.parent, dst.name) == []
    return err


def test_cli_success_prints_the_next_step(crops, tmp_path, capsys):
    src, _ = crops
    code, out, err = run_main(capsys, "--src", src, "--dst", tmp_path / "my-market", "--seed", "3")
    assert code == 0 and err == ""
    assert "python -m reid_utils.prepare --src" in out and "--dst data/prepared/my-market" in out
    assert "query" in out and "bounding_box_train" in out


def test_cli_bad_names_are_listed(crops, tmp_path, capsys):
    src, _ = crops
    bad = ["x_c1_a.jpg", "7_c0_a.jpg", "0_c1_a.jpg", "12345_c1_a.png", "8-c1.jpg", "9_c1.jpeg", "zz.png"]
    for name in bad:
        write_crop(src / name, 1, 1, 0)
    err = assert_user_error(capsys, tmp_path, tmp_path / "market", "--src", src, expect=["7 file name(s)", "2 more"])
    assert sum(f"'{name}'" in err for name in bad) == 5
    assert "cam must be 1-9" in err and "pid must be 1-9999" in err
    assert "<pid>_c<cam>_<anything>" in err


def test_cli_corrupt_image_is_named_and_nothing_written(crops, tmp_path, capsys):
    src, _ = crops
    (src / "6_c2_zzzz.jpg").write_bytes(b"this is not a jpeg")  # sorts last: many files were converted before
    assert_user_error(capsys, tmp_path, tmp_path / "market", "--src", src, expect=["6_c2_zzzz.jpg", "Remove it"])
    good = tmp_path / "truncated.png"
    write_crop(good, 1, 1, 0)
    (src / "6_c2_zzzz.jpg").unlink()
    (src / "5_c1_broken.png").write_bytes(good.read_bytes()[:60])
    assert_user_error(capsys, tmp_path, tmp_path / "market", "--src", src, expect=["5_c1_broken.png"])


def test_cli_source_and_destination_errors(crops, tmp_path, capsys):
    src, _ = crops
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no crops")
    assert_user_error(capsys, tmp_path, tmp_path / "m1", "--src", empty, expect=["no .jpg"])
    assert_user_error(capsys, tmp_path, tmp_path / "m2", "--src", tmp_path / "missing", expect=["does not exist"])
    one = tmp_path / "one"
    make_crops(one, pids=[4])
    assert_user_error(capsys, tmp_path, tmp_path / "m3", "--src", one, expect=["at least 2 images"])
    assert_user_error(capsys, tmp_path, tmp_path / "m4", "--src", src, "--test_fraction", "1", expect=["test_fraction"])
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = run_main(capsys, "--src", src, "--dst", existing)
    assert code == 2 and "already exists" in err and list(existing.iterdir()) == []


def test_ctrl_c_is_one_line_and_leaves_nothing(crops, tmp_path, monkeypatch, capsys):
    src, _ = crops
    """Ctrl-C gave a KeyboardInterrupt traceback; the folder itself was already safe (built aside)."""
    import reid_utils.own_data as own_data_module

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(own_data_module, "_convert", interrupt)
    assert main(["--src", str(src), "--dst", str(tmp_path / "mine")]) == 130  # 128 + SIGINT, as shells report it
    err = capsys.readouterr().err
    assert err.strip().startswith("own_data: interrupted") and "Traceback" not in err
    assert not (tmp_path / "mine").exists() and leftovers(tmp_path, "mine") == []
