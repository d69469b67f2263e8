"""Turn a Market-1501 folder into the ``ImageFolder`` layout the training code reads.

``python -m reid_utils.prepare --src data/Market-1501-v15.09.15 --dst data/prepared/Market``
builds::

    train/<pid>/...      every training image but one per identity (an identity's only image stays here)
    val/<pid>/...        one image per training identity that has two or more (the first by sorted name)
    train_all/<pid>/...  every training image (the ``--train_all`` recipe)
    query/<pid>/...      the query images
    gallery/<pid>/...    bounding_box_test, including the 0000 distractors and -1 junk
    multi-query/<pid>/   gt_bbox, only when the source has it

Files are hard links to the originals when source and destination share a file system
(no extra disk for the 36k real images, and unlike symbolic links they survive moving the
source), otherwise copies. The tree is built in a temporary folder and renamed into place at
the end, so an interrupted run never leaves a tree that looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from reid_utils.data import (
    MARKET_FOLDERS,
    PREPARED_MARKER,
    MarketNameError,
    display_path,
    parse_market_name,
    read_prepared_marker,
)
from reid_utils.files import atomic_folder, one_at_a_time, write_problem

FORMAT_VERSION = 1
MARKER = PREPARED_MARKER
# source folder -> prepared folder; train/val/train_all all come from bounding_box_train
_SPLITS = {"query": "query", "bounding_box_test": "gallery", "gt_bbox": "multi-query"}


class PrepareError(Exception):
    """Something about the source or destination the user has to fix."""


@dataclass(frozen=True)
class PrepareSummary:
    root: Path
    counts: dict[str, int]  # images per prepared folder
    identities: dict[str, int]  # sub-folders (pids) per prepared folder
    reused: bool  # True when an identical tree was already there


def _jpgs(folder: Path) -> list[Path]:
    """The images of a Market folder, sorted; other files (Market ships Thumbs.db) are ignored."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _plan(src: Path) -> dict[str, list[tuple[Path, str]]]:
    """Which source file goes to which ``<folder>/<pid>`` -- decided before anything is written."""
    missing = [name for name in MARKET_FOLDERS if not (src / name).is_dir()]
    if not src.is_dir():
        raise PrepareError(f"source folder {src} does not exist. Pass --src <the unzipped Market-1501 folder>.")
    if missing:
        raise PrepareError(
            f"{src} is not a Market-1501 folder: {', '.join(missing)} missing. Pass --src the folder "
            f"that holds bounding_box_train/, bounding_box_test/ and query/."
        )
    plan: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    sources = {"bounding_box_train": src / "bounding_box_train"}
    sources.update({name: src / name for name in _SPLITS if (src / name).is_dir()})
    for source_name, folder in sources.items():
        images = _jpgs(folder)
        if not images:
            raise PrepareError(f"{folder} holds no .jpg images. Is the download complete?")
        empty = [image for image in images if image.stat().st_size == 0]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise PrepareError(
                f"{empty[0]}{more} is empty (0 bytes): an unzip or copy that stopped early? Unzip Market-1501 "
                f"again, or delete the empty file(s)."
            )
        by_pid: dict[str, list[Path]] = defaultdict(list)
        for image in images:
            try:
                pid = parse_market_name(image.name).pid
            except MarketNameError as err:
                raise PrepareError(f"{folder}: {err}") from None
            by_pid["-1" if pid == -1 else f"{pid:04d}"].append(image)
        if source_name != "bounding_box_train":
            plan[_SPLITS[source_name]] = [(img, pid) for pid, imgs in by_pid.items() for img in imgs]
            continue
        for pid, imgs in by_pid.items():
            held_out = 1 if len(imgs) > 1 else 0  # an identity's only image trains: val cannot test a class never seen
            plan["val"] += [(img, pid) for img in imgs[:held_out]]  # first by sorted name: deterministic
            plan["train"] += [(img, pid) for img in imgs[held_out:]]
            plan["train_all"] += [(img, pid) for img in imgs]
        if not plan["val"]:
            raise PrepareError(
                f"no identity in {folder} has two images or more: val/ would be empty (training holds one image "
                f"of each identity out to measure itself). Add a second image of some identities."
            )
    return dict(plan)


def _place(source: Path, target: Path, mode: str) -> str:
    """Hard-link (or copy) one file; returns the mode that worked so later files skip failed tries."""
    if mode == "hardlink":
        try:
            os.link(source, target)
            return mode
        except OSError:
            mode = "copy"  # another file system, or links not allowed: fall back for the rest
    if mode == "symlink":
        target.symlink_to(source.resolve())
        return mode
    shutil.copy2(source, target)
    return mode


def tree_counts(dst: Path, folders) -> dict[str, int]:
    """Images per prepared folder as they are on the disk now (a file deleted or added by hand shows here)."""
    return {folder: sum(1 for p in (dst / folder).glob("*/*") if p.is_file()) for folder in folders}


def prepare_market(
    src: str | os.PathLike, dst: str | os.PathLike, link: str = "hardlink", quiet: bool = False
) -> PrepareSummary:
    """Build (or reuse) the prepared tree for ``src`` at ``dst``; see the module docstring."""
    if link not in ("hardlink", "symlink", "copy"):
        raise PrepareError(f"unknown link mode '{link}': use hardlink, symlink or copy.")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    plan = _plan(src)
    counts = {folder: len(items) for folder, items in sorted(plan.items())}
    identities = {folder: len({pid for _, pid in items}) for folder, items in sorted(plan.items())}
    wanted = {"version": FORMAT_VERSION, "source": str(src.resolve()), "counts": counts}

    reused = _reuse(dst, src, wanted, counts, identities, quiet)
    if reused is not None:
        return reused
    with one_at_a_time(dst):  # a second process preparing the same tree waits, then reuses it
        reused = _reuse(dst, src, wanted, counts, identities, quiet)
        if reused is not None:
            return reused
        _build(dst, src, plan, wanted, identities, link, quiet)
    return PrepareSummary(dst, counts, identities, reused=False)


def _reuse(dst: Path, src: Path, wanted: dict, counts: dict, identities: dict, quiet: bool) -> PrepareSummary | None:
    """The summary of an existing tree prepared from the same source, or None; refuses a folder of the user's."""
    if dst.exists() and not dst.is_dir():
        raise PrepareError(f"--dst {dst} is a file, not a folder. Choose a new --dst.")
    marker = read_prepared_marker(dst)
    same = marker is not None and {k: marker.get(k) for k in wanted} == wanted
    if same and tree_counts(dst, counts) == counts:
        if not quiet:
            print(f"{display_path(dst)} is already prepared from {display_path(src)}: nothing to do.")
        return PrepareSummary(dst, counts, identities, reused=True)
    if same and not quiet:
        print(f"{display_path(dst)} no longer holds every file it was prepared with: building it again.")
    if dst.exists() and marker is None and any(dst.iterdir()):
        raise PrepareError(f"{dst} exists and is not a prepared folder. Choose an empty or new --dst, or delete it.")
    return None


def _build(dst: Path, src: Path, plan: dict, wanted: dict, identities: dict, link: str, quiet: bool) -> None:
    with atomic_folder(dst) as tmp:  # replaces an older tree (other source or version) only at the end
        mode = link
        for folder, items in plan.items():
            for source, pid in items:
                (tmp / folder / pid).mkdir(parents=True, exist_ok=True)
                mode = _place(source, tmp / folder / pid / source.name, mode)
        (tmp / MARKER).write_text(json.dumps({**wanted, "identities": identities, "link": mode}, indent=1))
    if not quiet:
        how = {"hardlink": "hard links", "symlink": "symbolic links", "copy": "copies"}[mode]
        print(f"Prepared {display_path(dst)} from {display_path(src)} ({how}).")
        single = identities.get("train_all", 0) - identities.get("val", 0)
        if single:
            print(f"Note: {single} identities have a single training image: it is in train/ and train_all/, "
                  f"and val/ holds none of them.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reid_utils.prepare",
        description="Build the ImageFolder layout (train/ val/ train_all/ query/ gallery/) from Market-1501.",
    )
    parser.add_argument("--src", required=True, help="the Market-1501 folder (holds bounding_box_train/ ...)")
    parser.add_argument("--dst", required=True, help="where to write the prepared tree")
    parser.add_argument("--link", default="hardlink", choices=["hardlink", "symlink", "copy"])
    args = parser.parse_args(argv)
    try:
        summary = prepare_market(args.src, args.dst, link=args.link)
    except PrepareError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        print(f"\nprepare: interrupted; {args.dst} is as it was before. Run the same command again.", file=sys.stderr)
        return 130
    except OSError as err:
        problem = write_problem(err, where=args.dst)
        if problem is None:
            raise
        print(
            f"prepare: error: {problem}; {args.dst} is as it was before. Free some space or choose a --dst "
            f"you can write to (on the disk of --src, hard links need almost no space).",
            file=sys.stderr,
        )
        return 2
    for folder, n in summary.counts.items():
        print(f"  {folder:<12} {n:>6} images  {summary.identities[folder]:>5} identities")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
