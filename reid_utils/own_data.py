"""Turn a folder of your own person crops into a Market-1501-style folder.

``python -m reid_utils.own_data --src my_crops --dst data/my-market`` reads crops named
``<pid>_c<cam>_<anything>.jpg`` (``.jpeg`` and ``.png`` too, any case; pid 1-9999, camera 1-9;
for example ``17_c2_frame0042.png``) and writes::

    bounding_box_train/   the training identities
    bounding_box_test/    the gallery of the test identities
    query/                the queries of the test identities
    IMPORTED.json         the settings, the counts, and which crop became which file

with Market names ``PPPP_cCs1_FFFFFF_01.jpg`` (``FFFFFF`` counts the crops of one person in one
camera, in the order of their sorted source names), so ``python -m reid_utils.prepare``, training and
evaluation use it unchanged. Every image is re-saved as an RGB JPEG (quality 95) at its own size
(PNG converted; a rotation stored in the EXIF data is applied). Hidden files are skipped, other
files ignored, sub-folders not searched.

How the crops are split:

* Identities, not images, are split into train and test (a person is never in both), by a seeded
  shuffle: the same ``seed`` always gives the same split and the same file names. ``test_fraction``
  is the share of the identities with at least two images that go to test; each side keeps at least
  one. Only identities seen by two or more cameras can be tested (see below); the others train.
* An identity with a single image can neither be trained on (``prepare`` would put its only image
  into ``val/`` and none into ``train/``, and training refuses mismatched identities) nor be queried,
  so it goes to the gallery as a *distractor*: a person no query should find. The summary counts them.
* For a test identity, the first image (by sorted name) of each camera it appears in becomes a
  query and the others go to the gallery; a query is only kept when the gallery still holds an
  image of the same person from *another* camera (otherwise it joins the gallery).

Why cameras matter: Market-1501 evaluation ignores gallery images of the query's person taken by
the query's own camera. Those are usually neighbouring video frames, near-copies of the query that
any model finds, so counting them would measure nothing. Re-identification means finding the
person again in a *different* view.

Crops without camera ids (``cameras="none"``, ``--no_cameras``; names ``<pid>_<anything>.jpg``):
the importer then gives the images of each identity pseudo-cameras 1, 2, 3, ... by sorted name,
cycling through 1-6, and each test identity gets one query (its first image); so every other image
of the person counts as a match (except every sixth, which shares the query's pseudo-camera).
The results are then optimistic when the images are near-duplicate frames of one track, because
nothing removes the trivial matches any more. Record which camera took each crop if you can.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from reid_utils.data import MARKET_FOLDERS, display_path
from reid_utils.files import atomic_folder, replace_problem, write_problem

FORMAT_VERSION = 1
MARKER = "IMPORTED.json"
TRAIN_DIR, GALLERY_DIR, QUERY_DIR = MARKET_FOLDERS  # bounding_box_train, bounding_box_test, query
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CAMERA_MODES = ("names", "none")
PSEUDO_CAMERAS = 6  # as many as Market-1501 has
JPEG_QUALITY = 95
MAX_PID = 9999  # four digits in a Market name
SHOWN_BAD_NAMES = 5

_WITH_CAMERA = re.compile(r"^(?P<pid>\d+)_c(?P<cam>\d+)_(?P<rest>.*)\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_WITHOUT_CAMERA = re.compile(r"^(?P<pid>\d+)_(?P<rest>.*)\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_EXPECTED = {
    "names": "<pid>_c<cam>_<anything>.jpg|.jpeg|.png with pid 1-9999 and cam 1-9 (for example 17_c2_frame0042.png)",
    "none": "<pid>_<anything>.jpg|.jpeg|.png with pid 1-9999 (for example 17_frame0042.png)",
}


class CropImportError(Exception):
    """Something about the crops, the settings or the destination the user has to fix."""


@dataclass(frozen=True)
class ImportSummary:
    root: Path
    counts: dict[str, int]  # images per Market folder
    identities: dict[str, int]  # "train", "test" (queried) and "distractors" (single image, gallery only)
    cameras: str  # "names": from the file names; "none": pseudo-cameras


@dataclass(frozen=True)
class _Crop:
    source: Path
    pid: int
    camera: int


# --------------------------------------------------------------------------- reading the source


def _images(src: Path) -> list[Path]:
    """The crops directly in ``src``, sorted by name; hidden and non-image files are skipped."""
    if not src.exists():
        raise CropImportError(f"source folder {src} does not exist. Pass --src the folder that holds your crops.")
    if not src.is_dir():
        raise CropImportError(f"{src} is not a folder. Pass --src the folder that holds your crops.")
    images = sorted(
        (p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )
    if not images:
        raise CropImportError(
            f"{src} holds no .jpg, .jpeg or .png images (sub-folders are not searched). "
            f"Put the crops directly in it, named {_EXPECTED['names']}."
        )
    return images


def _name_problem(pid: int, camera: int | None) -> str | None:
    if not 1 <= pid <= MAX_PID:
        return f"pid must be 1-{MAX_PID}"
    if camera is not None and not 1 <= camera <= 9:
        return "cam must be 1-9"
    return None


def _parse(images: list[Path], cameras: str) -> list[_Crop]:
    """Identity and camera of every crop; every bad name is collected so one error lists them."""
    crops, bad, without_camera = [], [], False
    pattern = _WITH_CAMERA if cameras == "names" else _WITHOUT_CAMERA
    seen: dict[int, int] = defaultdict(int)  # pid -> images so far, for the pseudo-cameras
    for image in images:  # sorted by name: the pseudo-cameras follow that order
        match = pattern.match(image.name)
        if match is None:
            bad.append(f"'{image.name}'")
            without_camera = without_camera or bool(_WITHOUT_CAMERA.match(image.name))
            continue
        pid = int(match["pid"])
        camera = int(match["cam"]) if cameras == "names" else None
        problem = _name_problem(pid, camera)
        if problem:
            bad.append(f"'{image.name}' ({problem})")
            continue
        if camera is None:
            camera = seen[pid] % PSEUDO_CAMERAS + 1
        seen[pid] += 1
        crops.append(_Crop(image, pid, camera))
    if bad:
        shown = ", ".join(bad[:SHOWN_BAD_NAMES])
        more = f" and {len(bad) - SHOWN_BAD_NAMES} more" if len(bad) > SHOWN_BAD_NAMES else ""
        hint = " If your crops have no camera ids, use --no_cameras (cameras='none')." if without_camera else ""
        raise CropImportError(
            f"{len(bad)} file name(s) do not follow the expected pattern: {shown}{more}. "
            f"Expected {_EXPECTED[cameras]}; rename them or move them out of the folder.{hint}"
        )
    return crops


# --------------------------------------------------------------------------- the split


def _shuffle_key(seed: int, pid: int) -> bytes:
    """A per-identity random key: the order depends only on (seed, pid), on every Python version."""
    return hashlib.sha256(f"{seed}:{pid}".encode()).digest()


def _split_identities(
    by_pid: dict[int, list[_Crop]], test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(train, test, distractor) pids; see the module docstring for the rules."""
    usable = sorted(pid for pid, crops in by_pid.items() if len(crops) >= 2)
    distractors = sorted(pid for pid, crops in by_pid.items() if len(crops) == 1)
    if len(usable) < 2:
        raise CropImportError(
            f"only {len(usable)} identit{'y has' if len(usable) == 1 else 'ies have'} at least 2 images "
            f"({len(by_pid)} identities in all). Training and testing each need at least one person with "
            f"2 or more crops: add crops."
        )
    testable = [pid for pid in usable if len({crop.camera for crop in by_pid[pid]}) >= 2]
    if not testable:
        raise CropImportError(
            "no identity was seen by two different cameras, so no query could be matched in another view. "
            "Add crops of some people from a second camera (or use --no_cameras if you have no camera ids)."
        )
    n_test = min(max(round(test_fraction * len(usable)), 1), len(usable) - 1, len(testable))
    test = sorted(sorted(testable, key=lambda pid: _shuffle_key(seed, pid))[:n_test])
    train = sorted(set(usable) - set(test))
    return train, test, distractors


def _queries(crops: list[_Crop], cameras: str) -> set[Path]:
    """The crops of one test identity that become queries; each keeps a gallery match in another camera."""
    if cameras == "none":
        return {crops[0].source}  # pseudo-camera 1; the rest of the person is in other pseudo-cameras
    per_camera: dict[int, list[_Crop]] = defaultdict(list)
    for crop in crops:
        per_camera[crop.camera].append(crop)
    candidates = [per_camera[camera][0] for camera in sorted(per_camera)]
    gallery_cameras = [crop.camera for camera in per_camera for crop in per_camera[camera][1:]]
    queries = set()
    # Greedy in camera order: a kept query never returns to the gallery, so the gallery only grows
    # and a query that had a match in another camera keeps it.
    for candidate in candidates:
        if any(camera != candidate.camera for camera in gallery_cameras):
            queries.add(candidate.source)
        else:
            gallery_cameras.append(candidate.camera)
    return queries


def _plan(crops: list[_Crop], test_fraction: float, cameras: str, seed: int) -> tuple[list, dict[str, int]]:
    """``[(source, folder, name)]`` for every crop, decided before anything is written."""
    by_pid: dict[int, list[_Crop]] = defaultdict(list)
    for crop in crops:  # crops are sorted by source name
        by_pid[crop.pid].append(crop)
    train, test, distractors = _split_identities(by_pid, test_fraction, seed)
    plan = []
    frames: dict[tuple[int, int], int] = defaultdict(int)
    for pid in sorted(by_pid):
        queries = _queries(by_pid[pid], cameras) if pid in test else set()
        for crop in by_pid[pid]:
            frames[pid, crop.camera] += 1
            if crop.source in queries:
                folder = QUERY_DIR
            elif pid in train:
                folder = TRAIN_DIR
            else:
                folder = GALLERY_DIR
            plan.append((crop.source, folder, f"{pid:04d}_c{crop.camera}s1_{frames[pid, crop.camera]:06d}_01.jpg"))
    identities = {"train": len(train), "test": len(test), "distractors": len(distractors)}
    return plan, identities


# --------------------------------------------------------------------------- writing


def _convert(source: Path, target: Path) -> None:
    """Re-save one crop as an RGB JPEG at its own size; an unreadable file is the user's to fix."""
    try:
        with Image.open(source) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CropImportError(
            f"{source} cannot be read as an image ({err}). Remove it from the folder or fix it; nothing was written."
        ) from None
    rgb.save(target, format="JPEG", quality=JPEG_QUALITY)


def _read_marker(dst: Path) -> dict | None:
    try:
        marker = json.loads((dst / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _refuse_to_clobber(dst: Path, overwrite: bool) -> None:
    """Only ever replace a folder this importer made (or an empty one)."""
    problem = replace_problem(dst, overwrite, _read_marker(dst) is not None, MARKER, "this importer")
    if problem:
        raise CropImportError(problem)


def import_crops(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    test_fraction: float = 0.5,
    cameras: str = "names",
    seed: int = 0,
    overwrite: bool = False,
) -> ImportSummary:
    """Build the Market-1501-style folder ``dst`` from the crops in ``src``; see the module docstring.

    The folder is built in a hidden sibling and renamed into place when complete: on any error
    ``dst`` is left as it was.
    """
    if cameras not in CAMERA_MODES:
        raise CropImportError(f"unknown cameras mode {cameras!r}: use 'names' (from the file names) or 'none'.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise CropImportError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CropImportError(f"seed must be an integer, not {seed!r}.")
    src, root = Path(src).expanduser(), Path(dst).expanduser()
    target = root.absolute()
    if not target.name:
        raise CropImportError(f"cannot use {dst!r} as the destination: name a folder.")
    _refuse_to_clobber(target, overwrite)
    plan, identities = _plan(_parse(_images(src), cameras), test_fraction, cameras, seed)
    counts = {folder: sum(1 for _, f, _ in plan if f == folder) for folder in MARKET_FOLDERS}
    marker = {
        "version": FORMAT_VERSION,
        "source": str(src.resolve()),
        "test_fraction": test_fraction,
        "cameras": cameras,
        "seed": seed,
        "counts": counts,
        "identities": identities,
        "files": {f"{folder}/{name}": source.name for source, folder, name in plan},
    }

    with atomic_folder(target) as tmp:  # an old folder is removed only after the swap
        for folder in MARKET_FOLDERS:
            (tmp / folder).mkdir(parents=True)
        for source, folder, name in plan:
            _convert(source, tmp / folder / name)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        _refuse_to_clobber(target, overwrite)  # again: something may have appeared meanwhile
    return ImportSummary(root=root, counts=counts, identities=identities, cameras=cameras)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. User mistakes give one line on stderr and exit code 2, never a traceback."""
    parser = argparse.ArgumentParser(
        prog="python -m reid_utils.own_data",
        description="Turn a folder of person crops (<pid>_c<cam>_<anything>.jpg) into a Market-1501-style folder.",
    )
    parser.add_argument("--src", required=True, help="the folder that holds your crops")
    parser.add_argument("--dst", required=True, help="the Market-style folder to create, e.g. data/my-market")
    parser.add_argument(
        "--test_fraction", type=float, default=0.5, help="share of the identities used for testing (default: 0.5)"
    )
    parser.add_argument(
        "--no_cameras",
        action="store_true",
        help="names are <pid>_<anything>.jpg without camera ids: use pseudo-cameras (optimistic results)",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same split and names (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder made by an earlier import")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse already printed its message (or --help)
        return int(exit_request.code or 0)

    def user_error(message: str) -> int:
        print(f"own_data: error: {message}", file=sys.stderr)
        return 2

    cameras = "none" if args.no_cameras else "names"
    try:
        summary = import_crops(args.src, args.dst, args.test_fraction, cameras, args.seed, args.overwrite)
    except CropImportError as err:
        return user_error(str(err))
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        print(f"\nown_data: interrupted; {args.dst} is as it was before. Run the same command again.", file=sys.stderr)
        return 130
    except OSError as err:
        described = write_problem(err, where=args.dst)
        if described is not None:
            return user_error(f"{described}; {args.dst} is as it was before. Free some space or choose another --dst.")
        where = f" at {err.filename}" if err.filename else ""
        return user_error(f"cannot write to {args.dst} ({err.strerror or err}{where}); choose a writable --dst.")
    ids = summary.identities
    source = "camera ids from the file names" if cameras == "names" else "pseudo-cameras (no camera ids)"
    print(f"Imported {sum(summary.counts.values())} crops into {display_path(summary.root)} ({source}):")
    print(f"  {TRAIN_DIR:<19} {summary.counts[TRAIN_DIR]:>6} images  {ids['train']:>5} identities")
    print(f"  {QUERY_DIR:<19} {summary.counts[QUERY_DIR]:>6} images  {ids['test']:>5} identities")
    gallery_ids = ids["test"] + ids["distractors"]
    print(f"  {GALLERY_DIR:<19} {summary.counts[GALLERY_DIR]:>6} images  {gallery_ids:>5} identities")
    if ids["distractors"]:
        n = ids["distractors"]
        print(f"  {n} identit{'y' if n == 1 else 'ies'} with a single image went to the gallery as distractors.")
    if cameras == "none":
        print("  Without camera ids the scores are optimistic for near-duplicate frames; add camera ids if you can.")
    print(
        f"Next: python -m reid_utils.prepare --src {display_path(summary.root)} "
        f"--dst data/prepared/{summary.root.absolute().name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
