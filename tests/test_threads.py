"""How torch's OpenMP threads wait: a moment's spin, then asleep, wherever training starts (command lines, notebooks).

Threads that spin long beside another busy program made a 2-core machine train 3-7x slower (benchmarks/RESULTS.md).
OpenMP reads the setting once, when torch loads; ``OMP_DISPLAY_ENV=VERBOSE`` makes GNU OpenMP (torch's on Linux)
print what it read: ``GOMP_SPINCOUNT`` is how long a waiting thread spins before it sleeps (300000 by default,
300 as reid_utils sets it, 0 when waiting threads sleep at once).
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


def test_the_command_lines_make_waiting_threads_sleep_soon():
    assert openmp_spin_count(["-m", "reid_utils.train", "--help"]) == "300"


def test_a_users_own_wait_settings_win():
    assert openmp_spin_count(["-c", "import reid_utils, torch"], OMP_WAIT_POLICY="active") == "30000000000"
    assert openmp_spin_count(["-c", "import reid_utils, torch"], GOMP_SPINCOUNT="5") == "5"


def test_notebooks_import_reid_utils_before_torch():
    """In the notebooks that train or extract features the first import that loads torch (in a kernel, that one
    does) is one of reid_utils, so the package has set how torch's threads wait by then."""
    for name in ("03_training", "04_evaluation", "05_results_visualization", "06_going_further"):
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
        first = next(line for line in lines if TORCH_LOADERS.match(line))
        assert re.match(r"\s*(import|from) reid_utils\b", first), (name, first)
