"""A seeded generator of synthetic pedestrian crops in the Market-1501 layout.

Why it exists: the tutorial must run offline and in seconds, without asking anyone to download
Market-1501. So we draw little people ourselves and save them exactly the way Market does
(``bounding_box_train/``, ``bounding_box_test/`` (the gallery), ``query/``, files named
``PPPP_cCsS_FFFFFF_BB.jpg``). Everything the later notebooks do with the real data set works
unchanged on this one.

What makes it a re-identification problem rather than a toy:

* identity lives in *appearance* (clothing colours from a small shared palette, patterns, bags,
  hats, hair, skin, build), so several people share a colour and a model must combine cues;
* each camera has its own colour cast, brightness and background style, and every image adds pose,
  scale, shift, clutter, occluders, blur and JPEG noise, so the same person looks different across
  cameras;
* the gallery holds distractors (pid ``0000``) and junk (pid ``-1``), as in Market.

Two sizes (``--scale``): ``demo`` (the default, ~900 images, what the notebooks use) and
``market``, which has the paper's exact counts (751 train ids / 12,936 images, 3,368 queries of 750
ids, 19,732 gallery images with 2,793 distractors and 3,819 junk) so a full-size run can be
rehearsed without the download.

Every random decision comes from a generator derived from the seed and *what* is being drawn
(e.g. ``(seed, pid, camera, image index)``), never from a shared stream, so an image does not
depend on the order of generation and the same seed always gives byte-identical files.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from reid_utils.files import atomic_folder, replace_problem, write_problem

FORMAT_VERSION = 1
SUMMARY_FILE = "SYNTHETIC.json"
TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"
SPLITS = (TRAIN_DIR, GALLERY_DIR, QUERY_DIR)

DEFAULT_TRAIN_IDS = 48
DEFAULT_TEST_IDS = 48
NUM_CAMERAS = 6
NUM_SEQUENCES = 6
MAX_MARKET_PID = 1501
DISTRACTOR_PID = 0  # Market's label for false detections that belong to nobody
JUNK_PID = -1  # Market's label for images that must be ignored when scoring

CROP_HEIGHT, CROP_WIDTH = 128, 64
SUPERSAMPLE = 2  # draw at 2x and shrink: cheap anti-aliasing for the hand-drawn shapes
CANVAS_HEIGHT, CANVAS_WIDTH = CROP_HEIGHT * SUPERSAMPLE, CROP_WIDTH * SUPERSAMPLE

CAMERAS_PER_ID = (2, 4)  # inclusive ranges
IMAGES_PER_CAMERA = (2, 4)
QUERY_CAMERAS_PER_ID = 2
GAIT_RADIANS_PER_FRAME = 0.9  # consecutive frames show different phases of the walk

# Tags that keep the random streams of different kinds of decisions apart.
_STREAM_SPLIT, _STREAM_LOOK, _STREAM_TRACK, _STREAM_CAMERA = 1, 2, 3, 4
_STREAM_PERSON_IMAGE, _STREAM_DISTRACTOR, _STREAM_JUNK, _STREAM_EXTRAS = 5, 6, 7, 8
_STREAM_SCALE_COUNTS, _STREAM_SCALE_TRACK = 9, 10

# From this many images on, a generation takes long enough to deserve a progress bar and every CPU;
# below it (the default set: 928 images, about a second) a pool's start-up is not worth it.
LARGE_SET_IMAGES = 2_000
CHUNK_IMAGES = 128  # images per task handed to a worker process

RGB = tuple[int, int, int]

# Close pairs (navy/black, white/grey, red/pink ...) are deliberate: under a camera's colour cast
# they become ambiguous, which is what makes cross-camera matching hard.
DEFAULT_PALETTE: tuple[RGB, ...] = (
    (28, 28, 32),  # black
    (225, 225, 220),  # white
    (125, 125, 128),  # grey
    (35, 45, 95),  # navy
    (60, 105, 185),  # blue
    (185, 40, 40),  # red
    (45, 125, 65),  # green
    (195, 175, 130),  # beige
    (220, 190, 55),  # yellow
    (215, 135, 165),  # pink
    (105, 65, 145),  # purple
    (115, 75, 45),  # brown
)
HAIR_COLOURS: tuple[RGB, ...] = ((20, 18, 16), (60, 40, 25), (110, 75, 40), (200, 170, 100), (150, 150, 150))
SKIN_TONES: tuple[RGB, ...] = ((245, 210, 180), (225, 180, 140), (190, 140, 100), (140, 95, 65), (95, 65, 45))
SHOE_COLOURS: tuple[RGB, ...] = ((25, 25, 25), (235, 235, 235), (100, 65, 40), (90, 90, 95))
PATTERNS = ("plain", "horizontal", "vertical")
BAGS = ("none", "backpack", "shoulder")


@dataclass(frozen=True)
class Difficulty:
    """All the knobs that make the task harder or easier, in one place, so they can be tuned
    without touching the drawing code. Probabilities are per image unless stated otherwise."""

    palette: tuple[RGB, ...] = DEFAULT_PALETTE  # shared clothing colours; fewer = more look-alikes
    pattern_probability: float = 0.35  # per identity: striped instead of plain upper body
    bag_probability: float = 0.5  # per identity: carries a backpack or a shoulder bag
    hat_probability: float = 0.25  # per identity
    camera_cast: float = 0.14  # max per-channel gain change of a camera (0.14 = +-14 %)
    camera_brightness: float = 0.25  # max brightness change of a camera
    image_jitter: float = 0.06  # extra per-image gain/brightness change on top of the camera's
    noise_sigma: float = 7.0  # sensor noise, in 0..255 grey levels
    clutter_shapes: int = 6  # at most this many background rectangles/lines
    scale_jitter: float = 0.10  # relative change of the person's height in the crop
    shift_jitter: float = 0.10  # horizontal shift as a fraction of the crop width
    pose_swing: float = 0.35  # max leg swing in radians
    back_view_probability: float = 0.5  # seen from behind: face hidden, backpack covers the torso
    occluder_probability: float = 0.10  # a box or a pole in front of the person
    blur_probability: float = 0.3
    max_blur_radius: float = 1.2  # in crop pixels
    jpeg_quality: tuple[int, int] = (70, 95)  # inclusive range
    distractor_fraction: float = 0.06  # of the gallery, pid 0000
    junk_fraction: float = 0.04  # of the gallery, pid -1

    def __post_init__(self) -> None:
        probabilities = {
            "pattern_probability": self.pattern_probability,
            "bag_probability": self.bag_probability,
            "hat_probability": self.hat_probability,
            "back_view_probability": self.back_view_probability,
            "occluder_probability": self.occluder_probability,
            "blur_probability": self.blur_probability,
        }
        for name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Difficulty.{name} must be in [0, 1], got {value}")
        if len(self.palette) < 2:
            raise ValueError("Difficulty.palette needs at least 2 colours")
        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 95:
            raise ValueError(f"Difficulty.jpeg_quality must satisfy 1 <= low <= high <= 95, got {low, high}")
        if (
            self.distractor_fraction < 0
            or self.junk_fraction < 0
            or (self.distractor_fraction + self.junk_fraction >= 0.5)
        ):
            raise ValueError("Difficulty.distractor_fraction + junk_fraction must be in [0, 0.5)")


DEFAULT_DIFFICULTY = Difficulty()


@dataclass(frozen=True)
class Scale:
    """A named size preset. Totals left at ``None`` are whatever the per-identity draws give (the
    demo, whose identity counts can be changed); numbers are hit exactly, and then the identity
    counts are fixed and ``Difficulty.distractor_fraction``/``junk_fraction`` are not used."""

    name: str
    train_ids: int
    test_ids: int
    train_images: int | None = None
    query_images: int | None = None
    gallery_images: int | None = None  # distractors and junk included, as in bounding_box_test/
    distractors: int | None = None
    junk: int | None = None
    cameras_per_id: tuple[int, int] = CAMERAS_PER_ID  # inclusive ranges, used by exact scales only
    train_images_per_camera: tuple[int, int] = (1, 8)
    gallery_images_per_camera: tuple[int, int] = (1, 7)  # per test identity and camera, query excluded

    @property
    def exact(self) -> bool:
        return self.train_images is not None


DEFAULT_SCALE = "demo"
SCALES: dict[str, Scale] = {
    "demo": Scale("demo", DEFAULT_TRAIN_IDS, DEFAULT_TEST_IDS),
    # Zheng et al., ICCV 2015: every query camera of a test identity gets one query (at most 6).
    "market": Scale(
        "market",
        train_ids=751,
        test_ids=750,
        train_images=12_936,
        query_images=3_368,
        gallery_images=19_732,
        distractors=2_793,
        junk=3_819,
        cameras_per_id=(2, NUM_CAMERAS),
    ),
}


class OutputExistsError(FileExistsError):
    """The output folder is already there. A subclass so the CLI can tell "you asked to clobber
    something" apart from an operating-system error such as a file standing where a folder must go."""


@dataclass(frozen=True)
class SyntheticSummary:
    """What was generated; written to ``SYNTHETIC.json`` so a notebook can tell whether an
    existing folder is a complete synthetic set and with which settings it was made."""

    root: Path
    seed: int
    counts: dict[str, int]
    train_ids: int
    test_ids: int
    scale: str = DEFAULT_SCALE


@dataclass(frozen=True)
class Look:
    """The appearance of one identity. It never changes between images: it *is* the identity."""

    upper: RGB
    lower: RGB
    pattern: str
    pattern_colour: RGB
    bag: str
    bag_colour: RGB
    hat: bool
    hat_colour: RGB
    hair: RGB
    skin: RGB
    shoes: RGB
    torso_height: float  # relative build, ~1.0
    torso_width: float


@dataclass(frozen=True)
class Pose:
    """Where and how a person stands in one image (canvas pixels). Changes every image."""

    centre_x: float
    foot_y: float
    height: float
    leg_swing: float
    arm_swing: float
    facing_back: bool
    bag_side: int  # -1 = bag on the left of the image, +1 = right


@dataclass(frozen=True)
class CameraStyle:
    """What one camera does to every image it takes: colour cast, exposure and scenery."""

    gains: tuple[float, float, float]
    brightness: float
    wall: RGB
    ground: RGB
    horizon: float  # fraction of the crop height where the ground starts


@dataclass(frozen=True)
class Shot:
    """One image to write: its Market name fields and the split folder it goes to."""

    split: str
    pid: int
    camera: int
    sequence: int
    frame: int
    box: int
    index: int = 0  # which image of this pid in this camera; part of the image's random key

    @property
    def filename(self) -> str:
        pid = "-1" if self.pid == JUNK_PID else f"{self.pid:04d}"
        return f"{pid}_c{self.camera}s{self.sequence}_{self.frame:06d}_{self.box:02d}.jpg"


@dataclass(frozen=True)
class Plan:
    """Every image of the data set, decided before any pixel is drawn."""

    train_pids: tuple[int, ...]
    test_pids: tuple[int, ...]
    shots: tuple[Shot, ...]


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on the seed and on *what* it is used for."""
    return np.random.default_rng([seed, stream, *keys])


def _pick(rng: np.random.Generator, options: Sequence[RGB]) -> RGB:
    return options[int(rng.integers(len(options)))]


def _muted_colour(rng: np.random.Generator, low: int = 60, high: int = 190) -> RGB:
    """A dull colour (mixed towards grey) for scenery, so it rarely competes with clothing."""
    base = rng.integers(low, high, size=3).astype(float)
    grey = base.mean()
    r, g, b = (grey + 0.35 * (base - grey)).round().astype(int)
    return int(r), int(g), int(b)


def _shift_colour(colour: RGB, rng: np.random.Generator, amount: int) -> RGB:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return r, g, b


# --------------------------------------------------------------------------------------------
# Deciding who, where and when
# --------------------------------------------------------------------------------------------


def _validate_arguments(seed: int, train_ids: int, test_ids: int, flag: str = "") -> None:
    """Reject impossible requests early; ``flag="--"`` makes the messages name the CLI options."""
    if seed < 0:
        raise ValueError(f"{flag}seed must be >= 0 (got {seed}); use a non-negative seed")
    for name, value in ((f"{flag}train_ids", train_ids), (f"{flag}test_ids", test_ids)):
        if value < 2:
            raise ValueError(
                f"{name} must be at least 2 (got {value}): a split needs two identities to be useful; "
                f"use {name} 2 or more"
            )
    if train_ids + test_ids > MAX_MARKET_PID:
        raise ValueError(
            f"{flag}train_ids + {flag}test_ids must be at most {MAX_MARKET_PID} "
            f"(got {train_ids + test_ids}), the number of Market-1501 person ids; ask for fewer identities"
        )


def _resolve_scale(scale: str, train_ids: int | None, test_ids: int | None, flag: str = "") -> tuple[Scale, int, int]:
    """The preset and the identity counts to use: a demo's counts may be changed, an exact scale's not."""
    if scale not in SCALES:
        raise ValueError(f"{flag}scale must be one of {', '.join(SCALES)} (got {scale!r})")
    preset = SCALES[scale]
    if preset.exact:
        given = [
            f"{flag}{name}" for name, value in (("train_ids", train_ids), ("test_ids", test_ids)) if value is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} cannot be combined with {flag}scale {scale}, which fixes "
                f"{preset.train_ids} train and {preset.test_ids} test identities; drop {given[0]} "
                f"or use {flag}scale {DEFAULT_SCALE}"
            )
    train = preset.train_ids if train_ids is None else train_ids
    test = preset.test_ids if test_ids is None else test_ids
    return preset, train, test


def random_look(rng: np.random.Generator, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> Look:
    """Draw one person's appearance; colours come from the shared palette on purpose."""
    palette = difficulty.palette
    upper = _pick(rng, palette)
    p = difficulty.pattern_probability
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=[1 - p, p / 2, p / 2]))]
    pattern_colour = _pick(rng, [c for c in palette if c != upper])
    q = difficulty.bag_probability
    bag = BAGS[int(rng.choice(len(BAGS), p=[1 - q, q / 2, q / 2]))]
    return Look(
        upper=upper,
        lower=_pick(rng, palette),
        pattern=pattern,
        pattern_colour=pattern_colour,
        bag=bag,
        bag_colour=_pick(rng, palette),
        hat=bool(rng.random() < difficulty.hat_probability),
        hat_colour=_pick(rng, palette),
        hair=_pick(rng, HAIR_COLOURS),
        skin=_pick(rng, SKIN_TONES),
        shoes=_pick(rng, SHOE_COLOURS),
        torso_height=float(rng.uniform(0.88, 1.12)),
        torso_width=float(rng.uniform(0.82, 1.22)),
    )


def camera_style(seed: int, camera: int, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> CameraStyle:
    """Each camera gets a fixed cast, exposure and scenery: the main cross-camera nuisance."""
    rng = _rng(seed, _STREAM_CAMERA, camera)
    gains = 1.0 + rng.uniform(-difficulty.camera_cast, difficulty.camera_cast, size=3)
    return CameraStyle(
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        brightness=float(1.0 + rng.uniform(-difficulty.camera_brightness, difficulty.camera_brightness)),
        wall=_muted_colour(rng, 70, 200),
        ground=_muted_colour(rng, 50, 160),
        horizon=float(rng.uniform(0.45, 0.72)),
    )


def _choose_pids(seed: int, train_ids: int, test_ids: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint train/test identities, drawn without replacement from Market's pid range."""
    rng = _rng(seed, _STREAM_SPLIT)
    pids = rng.choice(np.arange(1, MAX_MARKET_PID + 1), size=train_ids + test_ids, replace=False)
    train = tuple(sorted(int(p) for p in pids[:train_ids]))
    test = tuple(sorted(int(p) for p in pids[train_ids:]))
    return train, test


def _track(seed: int, pid: int, images_per_camera: Sequence[int] | None = None) -> list[list[Shot]]:
    """One identity walking past 2-4 cameras: per camera one sequence id and a few nearby frames.

    An exact scale decides beforehand how many images each camera gets (``images_per_camera``, one
    entry per camera); only which cameras, sequences and frames are then drawn here.
    """
    if images_per_camera is None:
        rng = _rng(seed, _STREAM_TRACK, pid)
        n_cameras = int(rng.integers(CAMERAS_PER_ID[0], CAMERAS_PER_ID[1] + 1))
    else:
        rng = _rng(seed, _STREAM_SCALE_TRACK, pid)
        n_cameras = len(images_per_camera)
    cameras = sorted(int(c) for c in rng.choice(np.arange(1, NUM_CAMERAS + 1), size=n_cameras, replace=False))
    per_camera = []
    for i, camera in enumerate(cameras):
        sequence = int(rng.integers(1, NUM_SEQUENCES + 1))
        if images_per_camera is None:
            n_images = int(rng.integers(IMAGES_PER_CAMERA[0], IMAGES_PER_CAMERA[1] + 1))
        else:
            n_images = int(images_per_camera[i])
        step = int(rng.integers(4, 16))
        first = int(rng.integers(0, 999_999 - step * n_images))
        box = int(rng.integers(1, 4))
        per_camera.append(
            [Shot(TRAIN_DIR, pid, camera, sequence, first + step * k, box, index=k) for k in range(n_images)]
        )
    return per_camera


def _split_test_track(
    seed: int, pid: int, per_camera: list[list[Shot]], query_cameras: int = QUERY_CAMERAS_PER_ID
) -> list[Shot]:
    """Market keeps one query per identity per camera; the demo takes up to two cameras' worth."""
    rng = _rng(seed, _STREAM_TRACK, pid, 1)
    n_query = min(query_cameras, len(per_camera))
    query_cameras = set(int(i) for i in rng.choice(len(per_camera), size=n_query, replace=False))
    shots = []
    for i, camera_shots in enumerate(per_camera):
        query_index = int(rng.integers(len(camera_shots))) if i in query_cameras else -1
        for k, shot in enumerate(camera_shots):
            shots.append(replace(shot, split=QUERY_DIR if k == query_index else GALLERY_DIR))
    return shots


def _extra_counts(n_real_gallery: int, difficulty: Difficulty) -> tuple[int, int]:
    """How many distractors and junk images a demo gallery gets: fractions of the whole gallery."""
    rest = 1.0 - difficulty.distractor_fraction - difficulty.junk_fraction
    n_distractors = max(1, round(n_real_gallery * difficulty.distractor_fraction / rest))
    n_junk = max(1, round(n_real_gallery * difficulty.junk_fraction / rest))
    return n_distractors, n_junk


def _extras(seed: int, n_distractors: int, n_junk: int, taken: set[str]) -> list[Shot]:
    """Distractors (0000) and junk (-1) with names that clash with nothing else."""
    rng = _rng(seed, _STREAM_EXTRAS)
    shots = []
    for pid, count in ((DISTRACTOR_PID, n_distractors), (JUNK_PID, n_junk)):
        for index in range(count):
            while True:  # redraw on the (rare) name clash; deterministic because rng is
                shot = Shot(
                    GALLERY_DIR,
                    pid,
                    camera=int(rng.integers(1, NUM_CAMERAS + 1)),
                    sequence=int(rng.integers(1, NUM_SEQUENCES + 1)),
                    frame=int(rng.integers(0, 1_000_000)),
                    box=int(rng.integers(1, 9)),
                    index=index,
                )
                if shot.filename not in taken:
                    taken.add(shot.filename)
                    shots.append(shot)
                    break
    return shots


def _check_plan(plan: Plan) -> None:
    """The promises the evaluation relies on; cheap to check, expensive to discover broken later."""
    names = [s.filename for s in plan.shots]
    if len(names) != len(set(names)):
        raise AssertionError("duplicate file names in the synthetic plan")
    gallery_cameras: dict[int, set[int]] = {}
    for shot in plan.shots:
        if shot.split == GALLERY_DIR:
            gallery_cameras.setdefault(shot.pid, set()).add(shot.camera)
    for shot in plan.shots:
        if shot.split == QUERY_DIR and not gallery_cameras.get(shot.pid, set()) - {shot.camera}:
            raise AssertionError(f"query {shot.filename} has no gallery match in another camera")
    train_pids = {s.pid for s in plan.shots if s.split == TRAIN_DIR}
    test_pids = {s.pid for s in plan.shots if s.split != TRAIN_DIR} - {DISTRACTOR_PID, JUNK_PID}
    if train_pids & test_pids or train_pids & {DISTRACTOR_PID, JUNK_PID}:
        raise AssertionError("train identities must be real and disjoint from test identities")


def _exact_counts(rng: np.random.Generator, n: int, total: int, low: int, high: int) -> list[int]:
    """``n`` counts in ``[low, high]`` that add up to ``total``: drawn uniformly, then moved one step
    at a time at randomly chosen places until the sum is right (varied, yet exact)."""
    if not n * low <= total <= n * high:
        raise ValueError(f"cannot split {total} into {n} counts between {low} and {high}")
    counts = rng.integers(low, high + 1, size=n)
    while (gap := total - int(counts.sum())) != 0:
        step = 1 if gap > 0 else -1
        movable = np.flatnonzero(counts < high) if step > 0 else np.flatnonzero(counts > low)
        counts[rng.choice(movable, size=min(abs(gap), movable.size), replace=False)] += step
    return [int(c) for c in counts]


def _pieces(flat: list[int], sizes: Sequence[int]) -> Iterator[list[int]]:
    """Cut a flat list into consecutive pieces of the given sizes (one piece per identity)."""
    start = 0
    for size in sizes:
        yield flat[start : start + size]
        start += size


def _exact_shots(seed: int, preset: Scale, train_pids: Sequence[int], test_pids: Sequence[int]) -> list[Shot]:
    """Every person image of an exact scale: per-camera image counts are allotted first so that the
    train, query and real-gallery totals come out exactly; each test camera gets one query."""
    rng = _rng(seed, _STREAM_SCALE_COUNTS)
    assert preset.train_images is not None and preset.query_images is not None
    assert preset.gallery_images is not None and preset.distractors is not None and preset.junk is not None
    low, high = preset.cameras_per_id
    train_cameras = [int(n) for n in rng.integers(low, high + 1, size=len(train_pids))]
    train_images = _exact_counts(rng, sum(train_cameras), preset.train_images, *preset.train_images_per_camera)
    # One query per test camera, so the cameras per identity add up to the query count.
    test_cameras = _exact_counts(rng, len(test_pids), preset.query_images, low, high)
    n_real_gallery = preset.gallery_images - preset.distractors - preset.junk
    gallery_images = _exact_counts(rng, preset.query_images, n_real_gallery, *preset.gallery_images_per_camera)

    shots: list[Shot] = []
    for pid, per_camera in zip(train_pids, _pieces(train_images, train_cameras), strict=True):
        shots.extend(shot for camera_shots in _track(seed, pid, per_camera) for shot in camera_shots)
    for pid, per_camera in zip(test_pids, _pieces(gallery_images, test_cameras), strict=True):
        track = _track(seed, pid, [1 + n for n in per_camera])  # + the query
        shots.extend(_split_test_track(seed, pid, track, query_cameras=NUM_CAMERAS))
    return shots


def _check_exact_counts(plan: Plan, preset: Scale) -> None:
    """An exact scale promises the paper's numbers; a plan that misses one must never be drawn."""

    def count(split: str, pid: int | None = None) -> int:
        return sum(s.split == split and (pid is None or s.pid == pid) for s in plan.shots)

    wanted = {
        "train images": (count(TRAIN_DIR), preset.train_images),
        "query images": (count(QUERY_DIR), preset.query_images),
        "gallery images": (count(GALLERY_DIR), preset.gallery_images),
        "distractors": (count(GALLERY_DIR, DISTRACTOR_PID), preset.distractors),
        "junk images": (count(GALLERY_DIR, JUNK_PID), preset.junk),
    }
    for what, (got, expected) in wanted.items():
        if got != expected:
            raise AssertionError(f"the {preset.name} plan has {got} {what}, not {expected}")


def make_plan(
    seed: int,
    train_ids: int | None = None,
    test_ids: int | None = None,
    difficulty: Difficulty = DEFAULT_DIFFICULTY,
    scale: str = DEFAULT_SCALE,
) -> Plan:
    """Decide every file name before drawing, so the layout (and an exact scale's counts) can be
    checked up front, for the price of a list."""
    preset, train_ids, test_ids = _resolve_scale(scale, train_ids, test_ids)
    _validate_arguments(seed, train_ids, test_ids)
    train_pids, test_pids = _choose_pids(seed, train_ids, test_ids)
    shots: list[Shot] = []
    if preset.exact:
        assert preset.distractors is not None and preset.junk is not None
        shots = _exact_shots(seed, preset, train_pids, test_pids)
        n_distractors, n_junk = preset.distractors, preset.junk
    else:
        for pid in train_pids:
            shots.extend(shot for camera_shots in _track(seed, pid) for shot in camera_shots)
        for pid in test_pids:
            shots.extend(_split_test_track(seed, pid, _track(seed, pid)))
        n_distractors, n_junk = _extra_counts(sum(s.split == GALLERY_DIR for s in shots), difficulty)
    shots.extend(_extras(seed, n_distractors, n_junk, {s.filename for s in shots}))
    plan = Plan(train_pids, test_pids, tuple(shots))
    _check_plan(plan)
    if preset.exact:
        _check_exact_counts(plan, preset)
    return plan


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _limb(
    draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], width: float, fill: RGB
) -> None:
    """A thick segment as a polygon: arms and legs that can swing at any angle."""
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = -(y1 - y0) / length * width / 2, (x1 - x0) / length * width / 2
    draw.polygon([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)], fill=fill)


def _draw_stripes(
    draw: ImageDraw.ImageDraw,
    look: Look,
    top: float,
    bottom: float,
    top_half: float,
    bottom_half: float,
    centre_x: float,
    unit: float,
) -> None:
    """Stripes clipped to the trapezoid torso by interpolating its half-width along y."""
    stripe = max(2.0, 0.035 * unit)

    def half_width_at(y: float) -> float:
        return top_half + (bottom_half - top_half) * (y - top) / (bottom - top)

    if look.pattern == "horizontal":
        y = top + stripe
        while y + stripe <= bottom:
            a, b = half_width_at(y), half_width_at(y + stripe)
            draw.polygon(
                [
                    (centre_x - a, y),
                    (centre_x + a, y),
                    (centre_x + b, y + stripe),
                    (centre_x - b, y + stripe),
                ],
                fill=look.pattern_colour,
            )
            y += 2 * stripe
    elif look.pattern == "vertical":
        x = centre_x - bottom_half + stripe / 2  # the narrower hip width stays inside the torso
        while x + stripe <= centre_x + bottom_half:
            draw.rectangle([x, top, x + stripe, bottom], fill=look.pattern_colour)
            x += 2 * stripe


def draw_person(draw: ImageDraw.ImageDraw, look: Look, pose: Pose) -> None:
    """A recognisable little pedestrian from ellipses and polygons, back to front."""
    unit = pose.height
    cx, foot_y = pose.centre_x, pose.foot_y
    top = foot_y - unit
    head_h, head_w = 0.135 * unit, 0.10 * unit
    shoulder_y = top + head_h + 0.025 * unit
    hip_y = shoulder_y + 0.31 * unit * look.torso_height
    shoulder_half = 0.12 * unit * look.torso_width
    hip_half = 0.85 * shoulder_half
    leg_width = min(0.09 * unit * look.torso_width, 0.95 * hip_half)
    arm_width = 0.055 * unit
    shoe_h = 0.035 * unit

    if look.bag == "backpack" and not pose.facing_back:  # peeks out on both sides of the torso
        draw.rounded_rectangle(
            [
                cx - 1.15 * shoulder_half,
                shoulder_y + 0.03 * unit,
                cx + 1.15 * shoulder_half,
                shoulder_y + 0.22 * unit,
            ],
            radius=0.02 * unit,
            fill=look.bag_colour,
        )

    # Legs and shoes: the swing comes from the gait phase, opposite for the two legs.
    leg_length = foot_y - shoe_h - hip_y
    for side, swing in ((-1, pose.leg_swing), (1, -pose.leg_swing)):
        hip = (cx + side * hip_half / 2, hip_y)
        foot = (hip[0] + math.sin(swing) * leg_length, hip_y + math.cos(swing) * leg_length)
        _limb(draw, hip, foot, leg_width, look.lower)
        draw.ellipse(
            [foot[0] - 0.05 * unit, foot[1] - shoe_h / 2, foot[0] + 0.05 * unit, foot[1] + shoe_h],
            fill=look.shoes,
        )
    draw.rectangle([cx - hip_half, hip_y - 0.03 * unit, cx + hip_half, hip_y + 0.05 * unit], fill=look.lower)

    # Torso and its pattern.
    draw.rectangle([cx - 0.025 * unit, shoulder_y - 0.03 * unit, cx + 0.025 * unit, shoulder_y], fill=look.skin)
    draw.polygon(
        [
            (cx - shoulder_half, shoulder_y),
            (cx + shoulder_half, shoulder_y),
            (cx + hip_half, hip_y),
            (cx - hip_half, hip_y),
        ],
        fill=look.upper,
    )
    _draw_stripes(draw, look, shoulder_y, hip_y, shoulder_half, hip_half, cx, unit)

    if look.bag == "backpack":
        if pose.facing_back:
            draw.rounded_rectangle(
                [
                    cx - 0.8 * shoulder_half,
                    shoulder_y + 0.03 * unit,
                    cx + 0.8 * shoulder_half,
                    shoulder_y + 0.24 * unit,
                ],
                radius=0.03 * unit,
                fill=look.bag_colour,
            )
        else:
            for side in (-1, 1):
                strap_x = cx + side * 0.55 * shoulder_half
                draw.line(
                    [(strap_x, shoulder_y), (strap_x, shoulder_y + 0.16 * unit)],
                    fill=look.bag_colour,
                    width=max(1, round(0.02 * unit)),
                )

    # Arms swing against the legs; sleeves in the upper colour, hands in skin tone.
    arm_length = 0.36 * unit
    for side, swing in ((-1, pose.arm_swing), (1, -pose.arm_swing)):
        shoulder = (cx + side * (shoulder_half - arm_width / 3), shoulder_y + arm_width / 2)
        hand = (
            shoulder[0] + math.sin(swing) * arm_length + side * 0.02 * unit,
            shoulder[1] + math.cos(swing) * arm_length,
        )
        _limb(draw, shoulder, hand, arm_width, look.upper)
        r = 0.028 * unit
        draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=look.skin)

    if look.bag == "shoulder":
        side = pose.bag_side
        draw.line(
            [(cx - side * shoulder_half * 0.8, shoulder_y), (cx + side * hip_half, hip_y - 0.02 * unit)],
            fill=look.bag_colour,
            width=max(1, round(0.018 * unit)),
        )
        bag_x = cx + side * (hip_half + 0.02 * unit)
        draw.rectangle(
            [bag_x - 0.06 * unit, hip_y - 0.06 * unit, bag_x + 0.06 * unit, hip_y + 0.06 * unit],
            fill=look.bag_colour,
        )

    # Head: from behind we only see hair.
    head_box = [cx - head_w / 2, top, cx + head_w / 2, top + head_h]
    if pose.facing_back:
        draw.ellipse(head_box, fill=look.hair)
    else:
        draw.ellipse(head_box, fill=look.skin)
        draw.chord([head_box[0] - 1, top - 1, head_box[2] + 1, top + 0.75 * head_h], 180, 360, fill=look.hair)
    if look.hat:
        draw.rectangle(
            [cx - 0.6 * head_w, top + 0.18 * head_h, cx + 0.6 * head_w, top + 0.28 * head_h],
            fill=look.hat_colour,
        )
        draw.rectangle(
            [cx - 0.45 * head_w, top - 0.12 * head_h, cx + 0.45 * head_w, top + 0.2 * head_h],
            fill=look.hat_colour,
        )


def _random_pose(rng: np.random.Generator, difficulty: Difficulty, frame: int) -> Pose:
    """Scale/shift jitter of the crop and a gait phase that follows the frame number."""
    phase = frame * GAIT_RADIANS_PER_FRAME + rng.uniform(-0.4, 0.4)
    leg_swing = difficulty.pose_swing * math.sin(phase)
    return Pose(
        centre_x=CANVAS_WIDTH / 2 + rng.uniform(-1, 1) * difficulty.shift_jitter * CANVAS_WIDTH,
        foot_y=CANVAS_HEIGHT * (0.965 + rng.uniform(-0.025, 0.02)),
        height=CANVAS_HEIGHT * 0.86 * (1 + rng.uniform(-1, 1) * difficulty.scale_jitter),
        leg_swing=leg_swing,
        arm_swing=-0.8 * leg_swing,
        facing_back=bool(rng.random() < difficulty.back_view_probability),
        bag_side=1 if rng.random() < 0.5 else -1,
    )


def _background(camera: CameraStyle, rng: np.random.Generator, difficulty: Difficulty) -> Image.Image:
    """A wall, a ground plane and a few muted shapes: clutter a model must learn to ignore."""
    canvas = Image.new("RGB", (CANVAS_WIDTH, CANVAS_HEIGHT), _shift_colour(camera.wall, rng, 20))
    draw = ImageDraw.Draw(canvas)
    horizon = CANVAS_HEIGHT * (camera.horizon + rng.uniform(-0.06, 0.06))
    draw.rectangle([0, horizon, CANVAS_WIDTH, CANVAS_HEIGHT], fill=_shift_colour(camera.ground, rng, 14))
    for _ in range(int(rng.integers(1, difficulty.clutter_shapes + 1))):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * CANVAS_WIDTH)
        y0 = rng.uniform(0, horizon)
        y1 = min(horizon + 4, y0 + rng.uniform(0.08, 0.5) * CANVAS_HEIGHT)
        if rng.random() < 0.7:
            draw.rectangle([x0, y0, x1, y1], fill=_muted_colour(rng))
        else:
            draw.line([(x0, y0), (x1, y1)], fill=_muted_colour(rng), width=int(rng.integers(2, 6)))
    return canvas


def _draw_occluder(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """A pole or a box (bin, car, railing) in front of the person."""
    colour = _muted_colour(rng, 40, 200)
    if rng.random() < 0.5:
        width = rng.uniform(0.12, 0.28) * CANVAS_WIDTH
        x = rng.uniform(0, CANVAS_WIDTH - width)
        draw.rectangle([x, 0, x + width, CANVAS_HEIGHT], fill=colour)
    else:
        top = rng.uniform(0.55, 0.8) * CANVAS_HEIGHT
        x0 = rng.uniform(-0.3, 0.4) * CANVAS_WIDTH
        x1 = x0 + rng.uniform(0.5, 1.2) * CANVAS_WIDTH
        draw.rectangle([x0, top, x1, CANVAS_HEIGHT], fill=colour)


def _finish(canvas: Image.Image, camera: CameraStyle, rng: np.random.Generator, difficulty: Difficulty) -> Image.Image:
    """Shrink to crop size, then apply the camera: colour cast, exposure, noise, sometimes blur."""
    pixels = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    jitter = difficulty.image_jitter
    gains = np.asarray(camera.gains, dtype=np.float32) * (1 + rng.uniform(-jitter, jitter, size=3))
    brightness = camera.brightness * (1 + rng.uniform(-jitter, jitter))
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * difficulty.noise_sigma
    pixels = pixels * (gains * brightness).astype(np.float32) + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if rng.random() < difficulty.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, difficulty.max_blur_radius))))
    return image


def render_person(
    look: Look,
    camera: CameraStyle,
    rng: np.random.Generator,
    frame: int,
    difficulty: Difficulty = DEFAULT_DIFFICULTY,
) -> Image.Image:
    """One 128x64 crop of a person: identity from ``look``, everything else from ``rng``."""
    canvas = _background(camera, rng, difficulty)
    draw = ImageDraw.Draw(canvas)
    draw_person(draw, look, _random_pose(rng, difficulty, frame))
    if rng.random() < difficulty.occluder_probability:
        _draw_occluder(draw, rng)
    return _finish(canvas, camera, rng, difficulty)


def render_distractor(
    camera: CameraStyle, rng: np.random.Generator, difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> Image.Image:
    """A false detection: empty background, odd blobs, or a giant body part."""
    canvas = _background(camera, rng, difficulty)
    draw = ImageDraw.Draw(canvas)
    kind = int(rng.integers(3))
    if kind == 1:
        for _ in range(int(rng.integers(2, 6))):
            x0, x1 = sorted(rng.uniform(0, 1, size=2) * CANVAS_WIDTH)
            y0, y1 = sorted(rng.uniform(0, 1, size=2) * CANVAS_HEIGHT)
            fill = _pick(rng, difficulty.palette)
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x1 + 2, y1 + 2], fill=fill)
            else:
                points = [
                    (float(x), float(y)) for x, y in rng.uniform(0, 1, size=(3, 2)) * (CANVAS_WIDTH, CANVAS_HEIGHT)
                ]
                draw.polygon(points, fill=fill)
    elif kind == 2:
        pose = _random_pose(rng, difficulty, frame=int(rng.integers(1000)))
        zoom = rng.uniform(1.8, 2.6)
        pose = replace(pose, height=pose.height * zoom, foot_y=CANVAS_HEIGHT * rng.uniform(0.9, 2.2))
        draw_person(draw, random_look(rng, difficulty), pose)
    return _finish(canvas, camera, rng, difficulty)


def render_junk(
    camera: CameraStyle, rng: np.random.Generator, difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> Image.Image:
    """A person so badly cut off by the detector box that Market would mark it ``-1``."""
    canvas = _background(camera, rng, difficulty)
    pose = _random_pose(rng, difficulty, frame=int(rng.integers(1000)))
    if rng.random() < 0.5:  # pushed out sideways: only one edge of the body is visible
        side = 1 if rng.random() < 0.5 else -1
        pose = replace(pose, centre_x=CANVAS_WIDTH / 2 + side * rng.uniform(0.55, 0.75) * CANVAS_WIDTH)
    else:  # pushed down: only the head and shoulders are visible
        pose = replace(pose, foot_y=pose.foot_y + rng.uniform(0.5, 0.7) * CANVAS_HEIGHT)
    draw_person(ImageDraw.Draw(canvas), random_look(rng, difficulty), pose)
    return _finish(canvas, camera, rng, difficulty)


def _render_shot(
    seed: int, shot: Shot, looks: dict[int, Look], cameras: dict[int, CameraStyle], difficulty: Difficulty
) -> tuple[Image.Image, int]:
    """Pixels and JPEG quality for one shot, from a generator keyed by the shot itself."""
    camera = cameras[shot.camera]
    if shot.pid == DISTRACTOR_PID:
        rng = _rng(seed, _STREAM_DISTRACTOR, shot.index)
        image = render_distractor(camera, rng, difficulty)
    elif shot.pid == JUNK_PID:
        rng = _rng(seed, _STREAM_JUNK, shot.index)
        image = render_junk(camera, rng, difficulty)
    else:
        rng = _rng(seed, _STREAM_PERSON_IMAGE, shot.pid, shot.camera, shot.index)
        image = render_person(looks[shot.pid], camera, rng, shot.frame, difficulty)
    low, high = difficulty.jpeg_quality
    return image, int(rng.integers(low, high + 1))


# --------------------------------------------------------------------------------------------
# Writing, atomically
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShotWriter:
    """Renders and saves shots into one folder. Each shot's pixels depend only on the seed and the
    shot, so it does not matter which process writes which shot, or in what order."""

    folder: Path
    seed: int
    difficulty: Difficulty
    looks: dict[int, Look]
    cameras: dict[int, CameraStyle]

    @classmethod
    def for_plan(cls, folder: Path, seed: int, plan: Plan, difficulty: Difficulty) -> "_ShotWriter":
        pids = plan.train_pids + plan.test_pids
        looks = {pid: random_look(_rng(seed, _STREAM_LOOK, pid), difficulty) for pid in pids}
        cameras = {camera: camera_style(seed, camera, difficulty) for camera in range(1, NUM_CAMERAS + 1)}
        return cls(folder, seed, difficulty, looks, cameras)

    def write(self, shots: Sequence[Shot]) -> int:
        for shot in shots:
            image, quality = _render_shot(self.seed, shot, self.looks, self.cameras, self.difficulty)
            image.save(self.folder / shot.split / shot.filename, format="JPEG", quality=quality)
        return len(shots)


_worker_writer: _ShotWriter | None = None  # set once in each pool process, so looks are sent once


def _start_worker(writer: _ShotWriter) -> None:
    global _worker_writer
    _worker_writer = writer


def _write_in_worker(shots: Sequence[Shot]) -> int:
    assert _worker_writer is not None, "_start_worker did not run in this process"
    return _worker_writer.write(shots)


def available_cpus() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _write_images(
    folder: Path, seed: int, plan: Plan, difficulty: Difficulty, workers: int, progress: bool
) -> dict[str, int]:
    """Draw every shot, in ``workers`` processes when more than one; the bytes are the same either way."""
    writer = _ShotWriter.for_plan(folder, seed, plan, difficulty)
    for split in SPLITS:
        (folder / split).mkdir()
    chunks = [plan.shots[i : i + CHUNK_IMAGES] for i in range(0, len(plan.shots), CHUNK_IMAGES)]
    bar = tqdm(total=len(plan.shots), unit="img", desc="Drawing synthetic Market-1501", disable=not progress)
    try:
        if workers == 1:
            for chunk in chunks:
                bar.update(writer.write(chunk))
        else:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(writer,))
            try:
                for written in pool.map(_write_in_worker, chunks):
                    bar.update(written)
            finally:
                # On Ctrl-C or an error: drop the chunks not started and wait for the running ones,
                # so no worker is still writing into the folder when the caller deletes it.
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    counts = dict.fromkeys(SPLITS, 0)
    for shot in plan.shots:
        counts[shot.split] += 1
    return counts


def _summary_payload(summary: SyntheticSummary, difficulty: Difficulty) -> dict[str, object]:
    """The ``SYNTHETIC.json`` content. The scale is written only when it is not the demo, so demo
    sets keep the exact file they had before presets existed (and an absent scale reads as demo)."""
    payload: dict[str, object] = {"format_version": FORMAT_VERSION, "generator": "reid_utils.synthetic"}
    if summary.scale != DEFAULT_SCALE:
        payload["scale"] = summary.scale
    payload.update(
        seed=summary.seed,
        train_ids=summary.train_ids,
        test_ids=summary.test_ids,
        counts=summary.counts,
        difficulty=asdict(difficulty),
    )
    return payload


def read_summary(root: str | Path) -> SyntheticSummary | None:
    """Parse ``SYNTHETIC.json``; ``None`` means "not a complete synthetic set", never an error."""
    root = Path(root)
    try:
        payload = json.loads((root / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        return None
    counts = payload.get("counts")
    integers = [payload.get("seed"), payload.get("train_ids"), payload.get("test_ids")]
    if not isinstance(counts, dict) or set(counts) != set(SPLITS):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in integers + list(counts.values())):
        return None
    scale = payload.get("scale", DEFAULT_SCALE)
    if not isinstance(scale, str):
        return None
    seed, train_ids, test_ids = integers
    return SyntheticSummary(
        root=root,
        seed=seed,
        counts={s: counts[s] for s in SPLITS},
        train_ids=train_ids,
        test_ids=test_ids,
        scale=scale,
    )


def _refuse_to_clobber(out: Path, overwrite: bool) -> None:
    """Only ever replace a folder we made (or an empty one): ``--overwrite`` must not eat a home dir."""
    problem = replace_problem(out, overwrite, read_summary(out) is not None, SUMMARY_FILE, "the synthetic generator")
    if problem:
        raise OutputExistsError(problem)


def generate_market(
    out: str | Path,
    seed: int = 0,
    train_ids: int | None = None,
    test_ids: int | None = None,
    difficulty: Difficulty = DEFAULT_DIFFICULTY,
    overwrite: bool = False,
    scale: str = DEFAULT_SCALE,
    workers: int | None = None,
    progress: bool | None = None,
) -> SyntheticSummary:
    """Write a complete Market-1501-style data set to ``out`` and describe it.

    ``train_ids``/``test_ids`` default to the scale's (48/48 for the demo) and cannot be changed for
    ``scale="market"``. ``workers`` (processes drawing images) and ``progress`` (a tqdm bar) default
    to all CPUs and a bar for sets of ``LARGE_SET_IMAGES`` or more, else 1 and none; neither changes a
    single byte of the output.

    The set is built in a hidden sibling folder and renamed into place only when complete, so a
    crash or Ctrl-C never leaves ``out`` looking finished.
    """
    root = Path(out)
    plan_arguments = (seed, train_ids, test_ids, difficulty, scale)
    preset, train_ids, test_ids = _resolve_scale(scale, train_ids, test_ids)
    _validate_arguments(seed, train_ids, test_ids)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    target = root.absolute()
    if not target.name:
        raise ValueError(f"cannot use {out!r} as the output folder; name a folder")
    _refuse_to_clobber(target, overwrite)
    plan = make_plan(*plan_arguments)
    large = len(plan.shots) >= LARGE_SET_IMAGES
    if workers is None:
        workers = min(available_cpus(), len(plan.shots) // CHUNK_IMAGES + 1) if large else 1
    if progress is None:
        progress = large

    with atomic_folder(target) as staging:  # the old set is removed only after the swap
        counts = _write_images(staging, seed, plan, difficulty, workers, progress)
        summary = SyntheticSummary(
            root=root, seed=seed, counts=counts, train_ids=train_ids, test_ids=test_ids, scale=preset.name
        )
        payload = _summary_payload(summary, difficulty)
        (staging / SUMMARY_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        _refuse_to_clobber(target, overwrite)  # again: something may have appeared while we were drawing
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reid_utils.synthetic",
        description="Generate a synthetic data set in the Market-1501 layout (offline, deterministic).",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to create")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default: 0)")
    parser.add_argument(
        "--scale",
        choices=tuple(SCALES),
        default=DEFAULT_SCALE,
        help="demo: ~900 images in about a second (default); market: the paper's counts (751/750 ids, "
        "12,936 train, 3,368 query, 19,732 gallery images; ~150 MB), under a minute on two cores",
    )
    parser.add_argument(
        "--train_ids",
        type=int,
        default=None,
        help=f"identities in bounding_box_train (default: {DEFAULT_TRAIN_IDS}; --scale demo only)",
    )
    parser.add_argument(
        "--test_ids",
        type=int,
        default=None,
        help=f"identities in query/bounding_box_test (default: {DEFAULT_TEST_IDS}; --scale demo only)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"processes that draw images (default: all CPUs from {LARGE_SET_IMAGES:,} images on, else 1); "
        "the files are the same for any value",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. User mistakes give one line on stderr and exit code 2, never a traceback."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse already printed its message (or --help)
        return int(exit_request.code or 0)

    def user_error(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    try:
        _, train_ids, test_ids = _resolve_scale(args.scale, args.train_ids, args.test_ids, flag="--")
        _validate_arguments(args.seed, train_ids, test_ids, flag="--")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1 (got {args.workers})")
    except ValueError as problem:
        return user_error(str(problem))
    try:
        summary = generate_market(
            args.out,
            args.seed,
            args.train_ids,
            args.test_ids,
            overwrite=args.overwrite,
            scale=args.scale,
            workers=args.workers,
        )
    except OutputExistsError as problem:
        return user_error(str(problem))
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, what shells report for Ctrl-C
        print(f"\n{parser.prog}: interrupted; {args.out} is as it was before. Run the same command again.",
              file=sys.stderr)  # fmt: skip
        return 130
    except OSError as problem:
        described = write_problem(problem, where=args.out)
        if described is not None:
            return user_error(f"{described}; {args.out} is as it was before. Free some space or choose another --out.")
        where = f" at {problem.filename}" if problem.filename else ""
        return user_error(
            f"cannot write to {args.out} ({problem.strerror or problem}{where}); choose a writable --out folder"
        )
    counts = summary.counts
    scale_note = "" if summary.scale == DEFAULT_SCALE else f", scale {summary.scale}"  # the demo's line as before
    print(
        f"Synthetic Market-1501: {counts[TRAIN_DIR]} train, {counts[QUERY_DIR]} query, "
        f"{counts[GALLERY_DIR]} gallery images ({summary.train_ids} train ids, {summary.test_ids} test ids, "
        f"seed {summary.seed}{scale_note}) in {summary.root}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
