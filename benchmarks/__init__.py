"""Benchmarks of ReNeg's training step and per-sample tune (see benchmarks/README.md).

Run ``python benchmarks/bench.py --scale tiny`` (CPU, about a minute) or
``bash benchmarks/run_sd15.sh`` (one GPU, SD1.5-size models with random weights).
"""
