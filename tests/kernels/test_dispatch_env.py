"""DELTASERVE_KERNELS: `ref` forces the references; any other value set is a typo to report, not to ignore."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deltaserve.kernels import _dispatch


@pytest.mark.parametrize("value, want", [("", False), ("auto", False), ("ref", True), (" REF ", True)])
def test_known_values(value, want):
    assert _dispatch.parse_kernels(value) is want


@pytest.mark.parametrize("value", ["reference", "refs", "triton"])
def test_an_unknown_value_is_an_error_naming_the_variable(value):
    """'reference' ran the Triton kernels without a word: a user debugging a kernel compared it with itself."""
    with pytest.raises(ValueError, match=r"DELTASERVE_KERNELS='.*': expected 'ref' .* or 'auto'"):
        _dispatch.parse_kernels(value)


def test_the_command_line_reports_it():
    env = {**os.environ, "DELTASERVE_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-m", "deltaserve", "generate", "--max-tokens", "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "deltaserve: error: DELTASERVE_KERNELS='reference'" in out.stderr, out.stderr
