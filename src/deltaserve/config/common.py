"""What every config section shares: the error type, the validation helper and the one reader of the environment."""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or inconsistent; the message names the field and the fix."""


def env_flag(name: str, default: str = "") -> str:
    """The one place that reads environment variables (DELTASERVE_*)."""
    return os.environ.get(name, default)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def is_int(value: object) -> bool:
    """An int that is not a bool (`max_num_seqs=True` is a caller's bug, not a request for one sequence)."""
    return isinstance(value, int) and not isinstance(value, bool)
