"""Compute kernels, one package per op: ``ref.py`` (pure torch, fp32 math, runs anywhere) and the GPU module with the
same signatures (``triton.py``, or ``gpu.py`` where the GPU path routes between Triton and torch); docs/KERNELS.md."""
