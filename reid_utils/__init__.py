"""Helpers for the person re-identification tutorial series, one module per stage.

The stages, in the order the notebooks teach them:

- ``synthetic``  -- an embedded data set in the Market-1501 format, drawn offline in seconds (01)
- ``data``       -- file names, finding the data, the transforms, the ``ImageFolder`` loaders (01)
- ``prepare``    -- Market-1501 -> the ``train/ val/ train_all/ query/ gallery/`` layout (01)
- ``model``      -- ResNet backbone, pooling, ``ClassBlock``; the device (02)
- ``train``      -- the classic training loop, a whole run, the command line (03)
- ``runs``       -- a run folder: ``opts.yaml``, the checkpoint format, resuming, the newest checkpoint (03, 04)
- ``profiles``   -- the training profiles of notebooks 03-06 and the trained run they share (03-06)
- ``test``       -- flip-averaged features of a trained run, the command line (04)
- ``metrics``    -- CMC and mAP under the Market-1501 protocol (04)
- ``rerank``     -- k-reciprocal re-ranking (05)
- ``visualize``  -- image grids, live training curves, ranked lists (01-05)

Beside them, the extras:

- ``losses``, ``samplers``  -- the tricks: label smoothing, warm-up, triplet loss, P x K batches (06)
- ``fastdata``    -- the fast data path: images decoded once, batches augmented as tensors (06)
- ``fastrank``    -- what makes ``metrics.evaluate`` fast: float32 scores, exact near-ties, counted ranks (04)
- ``speed``       -- which precision, the CPU's abilities, the allocator (06)
- ``distributed`` -- several processes with ``torchrun`` (06)
- ``own_data``    -- your own crops in the Market-1501 format (06)
- ``files``       -- writing files and folders so that nothing is left half-written or built twice at once
- ``exercises``, ``student``, ``series`` -- the classroom: checkers, the student copy, running every notebook
"""

import os

# Threads, on purpose: torch's default count (one per core), and waiting threads that spin only a moment before they
# sleep. OpenMP's default spin (300,000 rounds) cost 60-70 % of the training speed beside any other busy program (a
# browser, a call) on 2 cores, 97 % in a Jupyter kernel; 300 rounds of GNU OpenMP (torch's on Linux) keep 60-63 %,
# at 0.78x-0.97x the default's idle speed, by host; no count tried keeps both (RESULTS.md). Read when torch loads: it
# counts where reid_utils comes first (the command lines, every notebook).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:  # yours win
    os.environ["GOMP_SPINCOUNT"] = "300"
    os.environ["OMP_WAIT_POLICY"] = "passive"  # other OpenMP runtimes (macOS, Windows): sleep at once
# numpy's OpenBLAS: after each product its threads spin 2**28 cycles (~0.1 s) before they sleep, on the cores that
# metrics.evaluate's ranking wants next (14 products at MSMT17 size: ~7 % of its CPU time). 2**4 cycles, the
# shortest OpenBLAS allows: its products here are large, so waking its threads costs nothing measurable. Read when
# numpy loads, so the same holds for it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # yours wins

__version__ = "0.1.0"
