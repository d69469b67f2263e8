"""How torch's OpenMP threads and numpy's BLAS threads wait: a moment's spin, then asleep (command lines, notebooks).

Threads that spin long beside another busy program made a 2-core machine train 3-7x slower (benchmarks/RESULTS.md).
OpenMP reads the setting once, when torch loads; ``OMP_DISPLAY_ENV=VERBOSE`` makes GNU OpenMP (torch's on Linux)
print what it read: ``GOMP_SPINCOUNT`` is how long a waiting thread spins before it sleeps (300000 by default,
300 as reid_utils sets it, 0 when waiting threads sleep at once). numpy's OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT``
when numpy loads; its threads are seen asleep or not in ``/proc``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the imports that load numpy or torch (matplotlib loads numpy), and reid_utils
LOADERS = re.compile(r"^\s*(import|from)\s+(numpy|matplotlib|torch|torchvision|PIL|reid_utils)\b")


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


def test_notebooks_import_reid_utils_before_numpy_and_torch():
    """In every notebook, the first import that loads numpy or torch (in a kernel, that one does) is one of
    reid_utils, so the package has set how their threads wait by then. (Beside a busy core, a kernel with OpenMP's
    default spin ran notebook 02 in 29-33 s instead of 6-8 s, and trained at 10 img/s instead of 199: RESULTS.md.)"""
    notebooks = sorted((ROOT / "notebooks").glob("0*.ipynb"))
    assert len(notebooks) >= 6
    for path in notebooks:
        name = path.stem
        cells = json.loads(path.read_text())["cells"]
        lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
        first = next(line for line in lines if LOADERS.match(line))
        assert re.match(r"\s*(import|from) reid_utils\b", first), (name, first)


AFTER_A_PRODUCT = """
import os, sys, time
if sys.argv[1] == "reid_utils first":
    import reid_utils
import numpy as np
a = np.ones((1000, 1000), dtype=np.float32)
a @ a
time.sleep(0.02)
workers = [t for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
print(" ".join(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] for t in workers))
"""


def openblas_worker_states(start: str) -> list[str]:
    """The states (R: running or waiting for a core, S: asleep) of numpy's BLAS threads 20 ms after a product."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("OPENBLAS_", "OMP_", "GOMP_"))}
    done = subprocess.run(
        [sys.executable, "-c", AFTER_A_PRODUCT, start], env={**clean, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread states from Linux's /proc")
def test_numpys_blas_threads_sleep_right_after_a_product():
    """OpenBLAS's threads spin ~0.1 s after a product by default, on a core the ranking of ``evaluate`` wants."""
    default = openblas_worker_states("numpy alone")
    if not default:
        pytest.skip("numpy's BLAS runs no threads of its own here (one core, or not OpenBLAS)")
    assert "R" in default, default  # the premise: by default they are still spinning
    assert set(openblas_worker_states("reid_utils first")) == {"S"}
