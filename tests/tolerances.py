"""Numerics policy for every kernel test, in one place (docs/DESIGN.md, "Numerics").

Reference ops are compared against float64 ground truth computed from the same inputs, so the only error allowed is
fp32 arithmetic plus the final rounding to the output dtype. GPU kernels are compared against the fp32 reference
with `assert_error_within`: at most about twice the error of a plain torch run in the same dtype, plus a small atol.
Never loosen a tolerance to make a test pass: find the bug.
"""

from __future__ import annotations

import torch

# (atol, rtol) for an output of the given dtype against a float64 truth. fp32: a few ulps of accumulated fp32 error;
# half types: the output rounding (bf16 keeps 8 significant bits, fp16 11), with headroom for the fp32 math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1.6e-2),
    torch.float16: (1e-5, 2e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype`."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; add it to tests/tolerances.py TOLERANCES")
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, with the tolerance of `dtype` (default:
    actual.dtype). Compared in float64; NaN anywhere in `actual` fails (unwritten NaN-sentinel output)."""
    atol, rtol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().cpu().double(), atol=atol, rtol=rtol, check_dtype=False
    )


def assert_error_within(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    expected: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
) -> None:
    """Kernel policy: max|actual - expected| <= factor * max|baseline - expected| + atol, where `expected` is the
    fp32 reference (or float64 truth) and `baseline` a plain torch run in the kernel's dtype."""
    expected = expected.detach().cpu().double()
    err = (actual.detach().cpu().double() - expected).abs().max().item()
    base = (baseline.detach().cpu().double() - expected).abs().max().item()
    assert err == err, "actual contains NaN (unwritten output?)"
    assert err <= factor * base + atol, f"max error {err:.3g} > {factor} * baseline {base:.3g} + {atol:.1g}"
