"""How much the CPU demo's numbers move with the CPU's arithmetic and the seed.

Trains notebook 03's ``cpu-demo`` profile and evaluates it as notebook 04 does, once per (instruction set, seed),
each in a fresh process: the native CPU, ``ATEN_CPU_CAPABILITY=avx2`` (with oneDNN held to AVX2) and ``=default``
stand in for students' laptops. Prints the final val error, rank-1 and mAP of each run, then the band they span.

    python benchmarks/demo_spread.py          # 3 instruction sets x seeds 0 1 2 (about 10 minutes on 2 cores)
    python benchmarks/demo_spread.py --isa native --seeds 0
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ISAS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def one_run(seed: int, model_dir: Path) -> dict:
    """The demo as notebooks 03 and 04 run it, with another seed: final val error, rank-1 and mAP."""
    import numpy as np
    import torch

    from reid_utils.data import default_data_root, find_dataset
    from reid_utils.model import build_model
    from reid_utils.prepare import prepare_market
    from reid_utils.profiles import PROFILES
    from reid_utils.test import evaluate_features, evaluation_loader, extract_features, load_trained_model
    from reid_utils.train import TrainOptions, train

    location = find_dataset(quiet=True)
    prepared = prepare_market(location.path, default_data_root() / "prepared" / location.path.name, quiet=True).root
    options = TrainOptions(data_dir=str(prepared), model_dir=str(model_dir), **{**PROFILES["cpu-demo"], "seed": seed})
    history = train(options, overwrite=True, quiet=True)
    model, options = load_trained_model(model_dir / options.name)
    features = {
        split: extract_features(model, evaluation_loader(prepared / split, options.height, options.width), flip=True)
        for split in ("query", "gallery")
    }
    result = evaluate_features(features["query"], features["gallery"])
    torch.manual_seed(options.seed)  # notebook 04's untrained network: the same one, random weights
    untrained = build_model(options)
    plain = {
        split: extract_features(untrained, evaluation_loader(prepared / split, options.height, options.width))
        for split in ("query", "gallery")
    }
    before = evaluate_features(plain["query"], plain["gallery"])
    counts, _ = np.histogram(result.ap, bins=20, range=(0, 1))
    return {
        "val_err": history["val_err"][-1], "rank1": float(result.cmc[0]), "mAP": float(result.mAP),
        # what notebooks 03 and 04 say of the demo run, checked in their cells
        "val_loss_max": max(history["val_loss"]), "val_loss_peak_epoch": int(np.argmax(history["val_loss"])) + 1,
        "mAP_gain": float(result.mAP / before.mAP), "rank1_gain": float(result.cmc[0] - before.cmc[0]),
        "top_bar_tallest": bool(counts.argmax() == len(counts) - 1), "ap_below_0.2": float((result.ap < 0.2).mean()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", nargs="+", default=list(ISAS), choices=list(ISAS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one run, in this process, with this seed
    args = parser.parse_args(argv)
    if args.child is not None:
        from reid_utils.series import use_test_environment

        use_test_environment()  # the notebooks' settings: synthetic set, random init, two threads
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(one_run(args.child, Path(folder))))
        return 0
    rows = []
    print(f"{'CPU arithmetic':<16}{'seed':>5}{'val error':>11}{'rank-1':>9}{'mAP':>8}{'peak val loss':>15}"
          f"{'mAP x untrained':>16}{'rank-1 +':>9}{'AP<0.2':>8}{'top bar':>8}")  # fmt: skip
    for isa in args.isa:
        for seed in args.seeds:
            env = {**os.environ, **ISAS[isa]}
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(seed)], env=env, capture_output=True, text=True, check=True
            )
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{isa:<16}{seed:>5}{row['val_err']:>11.3f}{100 * row['rank1']:>8.1f}%{100 * row['mAP']:>7.1f}%"
                  f"{row['val_loss_max']:>9.2f} (ep{row['val_loss_peak_epoch']:>2}){row['mAP_gain']:>15.2f}x"
                  f"{100 * row['rank1_gain']:>8.1f}{100 * row['ap_below_0.2']:>7.0f}%{str(row['top_bar_tallest']):>8}",
                  flush=True)  # fmt: skip
    for key, scale in (("val_err", 1), ("rank1", 100), ("mAP", 100)):
        values = [row[key] * scale for row in rows]
        print(f"{key:<8} band {min(values):.3f} - {max(values):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
