"""Reproducible speed and memory measurements: each prints a Markdown table and writes
benchmarks/results/<name>.json. `python -m benchmarks.run_all` runs them all."""

import os

# On a shared CPU machine, OpenMP threads that spin-wait (libgomp's default) lose whole time
# slices whenever another process runs: a tiny-model step measured 0.2 s passive and 1-7 s
# spinning. Set before torch is first imported (it has no effect afterwards); recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
