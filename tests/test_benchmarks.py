"""The benchmark scripts still run (tiny settings) and print every figure they promise. No timing is judged."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, arguments: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *arguments])
    try:
        runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    except SystemExit as end:
        assert end.code in (0, None), end.code
    return capsys.readouterr().out


def test_bench_train_prints_every_path_and_the_summary(tmp_path, monkeypatch, capsys):
    out = run_script(
        "bench_train.py",
        ["--configs", "demo", "--demo_epochs", "1", "--train_ids", "8", "--test_ids", "6", "--extract_repeats", "1",
         "--work_dir", str(tmp_path)],
        monkeypatch, capsys,
    )  # fmt: skip
    for path in ("classic", "cached", "cached+CL", "cached+fused", "cached+CL+fused"):
        match = re.search(rf"train {re.escape(path)} +([\d.]+) img/s", out)
        assert match and float(match.group(1)) > 0, path
    assert "features differ by at most 0.0e+00" in out  # same model, same pixels: the same features
    assert re.search(r"demo: data path .* 60 epochs of Market-1501's 12,936 training images would take \d+ min", out)


def test_bench_train_busy_compares_idle_and_busy_runs_of_the_command_line(tmp_path, monkeypatch, capsys):
    out = run_script(
        "bench_train.py",
        ["--busy", "--starts", "as shipped", "--busy_rounds", "1", "--busy_epochs", "2", "--train_ids", "6",
         "--test_ids", "4", "--work_dir", str(tmp_path)],
        monkeypatch, capsys,
    )  # fmt: skip
    assert re.search(r"round 1 idle: as shipped +[\d.]+ img/s", out) and re.search(r"round 1 busy: as shipped", out)
    assert re.search(r"as shipped +idle +[\d.]+ img/s, busy +[\d.]+ img/s: keeps \d+% beside a busy core", out)


def test_gpu_check_runs_its_steps_in_the_smoke_setting(tmp_path, monkeypatch, capsys):
    out = run_script("gpu_check.py", ["--smoke", "--epochs", "2", "--work_dir", str(tmp_path)], monkeypatch, capsys)
    assert re.search(r"train: \d+ images per epoch, first epoch [\d.]+ s \(cache included\), then \d+ img/s", out)
    assert re.search(r"extract: \d+ images \(flip-averaged\) at \d+ img/s", out)
    assert "evaluate:" in out and "mAP" in out
    assert "resume of a killed run: exact" in out  # on a CPU the resumed run is the uninterrupted one


def test_bench_bf16_cpu_prints_both_curves_and_the_check(tiny_prepared, monkeypatch, capsys):
    arguments = ["--sizes", "32x16", "--epochs", "1", "--data_dir", str(tiny_prepared)]
    out = run_script("bench_bf16_cpu.py", arguments, monkeypatch, capsys)
    assert re.search(r"32x16: start-up check: gradients up to [\d.]+x off \(allowed 4x\): bf16 (kept|refused)", out)
    curves = re.findall(r"^ +(?:train_loss|val_err)? +(fp32|bf16) +[\d.]+$", out, re.MULTILINE)
    assert curves == ["fp32", "bf16", "fp32", "bf16"]  # training loss and val error of both runs
    assert re.search(r"bf16 follows float32: training loss at most [\d.]+% apart over 1 epochs", out)


def test_bench_evaluate_prints_the_ratio_and_checks_identity(monkeypatch, capsys):
    out = run_script("bench_evaluate.py", ["--shrink", "40", "--repeats", "1"], monkeypatch, capsys)
    assert out.count(": True") == 4 and "False" not in out  # bit-identical to the loop: both kinds, both APs
    for kind in ("separated", "hard"):  # each kind against the product and against the loop
        assert re.search(
            rf"{kind} idle \(median of 1\): product [\d.]+ s, evaluate [\d.]+ s: [\d.]+x the product "
            r"\(CPU seconds: [\d.]+x\); per-query loop .*: [\d.]+x evaluate",
            out,
        ), kind


def test_bench_evaluate_msmt_size_reports_memory(monkeypatch, capsys):
    out = run_script(
        "bench_evaluate.py", ["--size", "msmt", "--shrink", "200", "--repeats", "1", "--features", "hard"],
        monkeypatch, capsys,
    )  # fmt: skip
    assert out.count(": True") == 2 and "False" not in out
    assert re.search(r"hard idle \(median of 1\): product [\d.]+ s, evaluate [\d.]+ s: [\d.]+x the product \(CPU", out)
    assert re.search(r"hard: memory of one evaluate call above the features .*: peak resident \+\d+ MiB", out)


def test_bench_evaluate_old_loads_the_fast_path_of_that_revision_too(monkeypatch, capsys):
    """``--old REV`` must time the old ranking: since the fast path moved to ``fastrank.py``, loading the old
    ``metrics.py`` alone would have compared today's ``fastrank`` with itself."""
    import numpy as np

    import reid_utils.fastrank as current

    script = runpy.run_path(str(ROOT / "benchmarks" / "bench_evaluate.py"))
    old_evaluate = script["load_old_evaluate"]("HEAD")
    old_rank_blocks = old_evaluate.__globals__["rank_blocks"]
    assert old_rank_blocks.__module__ == "fastrank_old" and old_rank_blocks is not current.rank_blocks
    assert sys.modules["reid_utils.fastrank"] is current  # put back for everything else
    data = script["make_market_like"](**script["shrunk"](script["MARKET"], 40), noise=3.3)
    assert script["identical"](old_evaluate(*data.inputs()), script["evaluate"](*data.inputs()))

    out = run_script("bench_evaluate.py", ["--shrink", "40", "--repeats", "1", "--old", "HEAD"], monkeypatch, capsys)
    assert re.search(r"old +[\d.]+ s: [\d.]+x evaluate", out) and "False" not in out
    assert np.isfinite(float(re.search(r"old +([\d.]+) s", out).group(1)))
