"""How torch's OpenMP threads wait: asleep, wherever training starts (command lines and notebooks).

Spinning threads beside another busy program made a 2-core machine train 5-7x slower (benchmarks/RESULTS.md).
OpenMP reads the setting once, when torch loads; ``OMP_DISPLAY_ENV=VERBOSE`` makes GNU OpenMP (torch's on Linux)
print what it read: ``GOMP_SPINCOUNT`` is how long a waiting thread spins before it sleeps (300000 by default,
0 when waiting threads sleep at once).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_LOADERS = re.compile(r"^\s*(import|from)\s+(torch|torchvision|reid_utils)\b")


def openmp_spin_count(code: list[str], **env: str) -> str:
    """The spin count OpenMP settles on in a fresh Python running ``code``, on a machine without our test settings."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "GOMP_"))}
    clean.update(env, OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *code], env=clean, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr).group(1)


def test_the_command_lines_make_waiting_threads_sleep():
    assert openmp_spin_count(["-m", "reid_utils.train", "--help"]) == "0"


def test_a_users_own_wait_policy_wins():
    assert openmp_spin_count(["-c", "import reid_utils, torch"], OMP_WAIT_POLICY="active") == "30000000000"


def test_notebooks_set_the_wait_policy_before_torch_loads():
    """In the notebooks that train or extract features, the first import that loads torch is either reid_utils
    (which sets the policy) or comes after the notebook's own line: in a kernel, that import loads torch."""
    setting = 'os.environ.setdefault("OMP_WAIT_POLICY", "passive")'
    for name in ("03_training", "04_evaluation", "05_results_visualization", "06_going_further"):
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
        first = next(i for i, line in enumerate(lines) if TORCH_LOADERS.match(line))
        assert "reid_utils" in lines[first] or setting in lines[:first], name
