"""Compute kernels, one package per op: ``ref.py`` (pure torch, fp32 math, runs on CPU) and, later, ``triton.py``."""
