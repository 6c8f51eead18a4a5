"""Checks of config settings (numbers, layer sizes, switches), each refusing a bad value with a
message that names its config key (`model.augment.gain_db`, `loss.margin`, ...)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def flag(value: object, key: str) -> bool:
    """A true/false config value, else a ValueError naming the config `key` (bool("no") is True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: must be true or false.")
    return value


def non_negative(value: object, key: str, whole: bool) -> float:
    """`value` of the config key `key`, checked to be a finite number >= 0 (a whole number when
    `whole`); else a ValueError naming the key."""
    if not _is_number(value) or value < 0 or (whole and not float(value).is_integer()):
        kind = "a whole number" if whole else "a finite number"
        raise ValueError(f"{key}={value!r}: must be {kind} >= 0 (0 turns it off).")
    return float(value)


def size(value: object, key: str) -> int:
    """`value` of the config key `key`, the size of a layer's output, checked to be a whole
    number >= 1 (a 0-d embedding trained nothing and scored chance); else a ValueError."""
    if not _is_number(value) or value < 1 or not float(value).is_integer():
        raise ValueError(f"{key}={value!r}: a layer's output size must be a whole number >= 1.")
    return int(value)


def count(value: object, key: str, why: str) -> int:
    """`value` of the config key `key`, checked to be a whole number >= 1; else a ValueError
    naming the key and `why` (what a smaller value would do)."""
    if not _is_number(value) or value < 1 or not float(value).is_integer():
        raise ValueError(f"{key}={value!r}: must be a whole number >= 1. {why}")
    return int(value)


def sizes(values: object, key: str) -> list[int]:
    """`values` of the config key `key`, one layer's output size per layer (a CNN's channels),
    checked to name at least one layer and each to be a `size`; else a ValueError naming the key
    (and the entry, `key[i]`)."""
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ValueError(f"{key}={values!r}: must list one output size per layer, at least one "
                         "(e.g. [16, 32, 64, 128]).")
    return [size(value, f"{key}[{i}]") for i, value in enumerate(values)]


def dropout_probability(value: object, key: str) -> float:
    """`value` of the config key `key`, checked to lie in [0, 1): a dropout of 1 zeroes every
    value in training, so nothing before it learns; else a ValueError."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r}: a dropout probability must lie in [0, 1) (1 would "
                         "zero every value in training, so nothing before it would learn; 0 turns "
                         "it off).")
    return float(value)
