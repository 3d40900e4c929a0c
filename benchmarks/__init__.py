"""Measurements: system throughput on CPU (throughput.py), the one-call GPU check (gpu_check.py) and the
convergence speed-up of each timestep strategy over uniform sampling (speedup.py)."""
