"""A curated attribute table (organology facts) encoded as one vector per instrument.

Categorical attributes become one-hot (multi-hot for lists) columns over the values that occur
in the whole table, so a class's vector does not depend on which other classes are requested;
numeric attributes (e.g. the written range in MIDI numbers) are standardised over the rows
`standardize_on` names. The config's `train_classes` takes the classes each fit trains on, so that
no held-out class's values (a test class's, or a pseudo-unseen one's in validation) move the
vectors training reads (`fewzero.eval` keeps the run's rows, so that rows added for new classes,
or another seen list, leave the vectors the checkpoint trained with as they were).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fewzero.data.clips import check_covered
from fewzero.side_info.base import ClassVectors, SideInformation

# `standardize_on`'s value for the classes each fit trains on
TRAIN_CLASSES = "train_classes"


def _values(value: Any) -> list[str]:
    """A cell as a list of values: a scalar gives one, a list (or ListConfig) several."""
    return [str(value)] if isinstance(value, str | int | float) else [str(v) for v in value]


def _is_number(value: Any) -> bool:
    """A finite number (a NaN would make its column's spread NaN, and that column 0 for every
    class)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and math.isfinite(number)


def new_values(table: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Mapping[str, Any]],
               categorical: Sequence[str]) -> list[str]:
    """`side_info.table.<class>.<attribute>=<value>` for every categorical value of `table` that
    no row of `reference` has: each is a column that the encoding of `reference` lacks."""
    known = {(a, v) for row in reference.values() for a in categorical if a in row
             for v in _values(row[a])}
    return [f"side_info.table.{name}.{a}={v}" for name, row in table.items() for a in categorical
            if a in row for v in dict.fromkeys(_values(row[a])) if (a, v) not in known]


def encode_attribute_table(table: Mapping[str, Mapping[str, Any]], categorical: Sequence[str],
                           numeric: Sequence[str], numeric_weight: float = 1.0,
                           standardize_on: Sequence[str] | None = None
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encode every row of `table`; numeric columns are standardised with the mean and spread of
    the rows `standardize_on` names (None: every row).

    Returns:
        ({class name: (dim,) vector}, column names of length dim).
    Raises a ValueError naming the class and attribute when a value is missing, or a numeric
    one is not a number, or the rows of `standardize_on` the table lacks.
    """
    missing = [f"side_info.table.{name}.{a}" for name, row in table.items()
               for a in (*categorical, *numeric) if row.get(a) is None]  # absent, or left empty
    if missing:
        raise ValueError(f"These attribute values are missing: {missing}. Give every class of "
                         "side_info.table a value for each attribute of side_info.categorical and "
                         "side_info.numeric, or remove the attribute from those lists.")
    columns: list[str] = []
    for attribute in categorical:
        values = sorted({v for row in table.values() for v in _values(row[attribute])})
        columns += [f"{attribute}={v}" for v in values]
    not_numbers = [f"side_info.table.{name}.{a}={row[a]!r}" for name, row in table.items()
                   for a in numeric if not _is_number(row[a])]
    if not_numbers:
        raise ValueError(f"Numeric attributes take numbers, but these are not: {not_numbers}. "
                         "Write numbers there (ranges are MIDI note numbers, "
                         "e.g. range_low: 58), or move the attribute from side_info.numeric to "
                         "side_info.categorical.")
    names = list(table) if standardize_on is None else list(standardize_on)
    absent = [name for name in names if name not in table]
    if absent or not names:
        raise ValueError(f"side_info.standardize_on names {absent or 'no row'}, which side_info.table "
                         "has no row for: name rows of the table, or set it to null (every row).")
    vectors = {}
    numbers = torch.tensor([[float(row[a]) for a in numeric] for row in table.values()]).reshape(
        len(table), len(numeric))  # (n_rows, n_numeric)
    reference = numbers[[list(table).index(name) for name in names]]
    # a column the reference rows do not vary in (one row, or one value) tells no class from
    # another: 0 in every row, not the other rows' distance from that value divided by ~0
    spread = (reference.std(dim=0) if len(reference) > 1 and numeric  # std of no column warns
              else torch.zeros(len(numeric)))
    varies = spread > 1e-6
    standardised = torch.where(varies, (numbers - reference.mean(dim=0)) / spread.where(varies, 1.0), 0.0)
    for i, (name, row) in enumerate(table.items()):
        hot = torch.zeros(len(columns))
        for attribute in categorical:
            for v in _values(row[attribute]):
                hot[columns.index(f"{attribute}={v}")] = 1.0
        vectors[name] = torch.cat([hot, numeric_weight * standardised[i]])
    return vectors, columns + list(numeric)


class AttributeTable(SideInformation):
    """Attribute vectors from a table written in YAML (`configs/side_info/attributes.yaml`).

    Args:
        table: class name -> {attribute: value or list of values, numeric attribute: number}.
        categorical: attribute names one-hot encoded.
        numeric: attribute names used as standardised numbers.
        numeric_weight: scale of the numeric columns relative to a one-hot column.
        dim: number of encoded columns (checked).
        standardize_on: the rows whose mean and spread standardise the numeric columns:
            `"train_classes"` (the config's), the classes the fit trains on (`vectors`' `fit_on`:
            the validation phase's, each class cross-validation fold's, the refit's); a list of
            rows; None: every row. Over every row, a test class's values would move the training
            classes' vectors, and over the seen classes, a pseudo-unseen class's would in
            validation.
    """

    kind = "attributes"

    def __init__(self, table: Mapping[str, Mapping[str, Any]], categorical: Sequence[str],
                 numeric: Sequence[str] = (), numeric_weight: float = 1.0, dim: int = 0,
                 standardize_on: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(dim, **kwargs)
        self.table = {name: dict(row) for name, row in dict(table).items()}
        self.categorical, self.numeric = list(categorical), list(numeric)
        self.numeric_weight = numeric_weight
        if isinstance(standardize_on, str) and standardize_on != TRAIN_CLASSES:
            raise ValueError(f"side_info.standardize_on={standardize_on!r} is neither "
                             f"{TRAIN_CLASSES!r} (the classes each fit trains on), a list of "
                             "side_info.table rows, nor null (every row).")
        self.standardize_on: str | list[str] | None = (
            standardize_on if standardize_on is None or isinstance(standardize_on, str)
            else list(standardize_on))

    def vectors(self, class_names: Sequence[str], fit_on: Sequence[str] | None = None) -> ClassVectors:
        if self.standardize_on != TRAIN_CLASSES:
            return super().vectors(class_names, fit_on)
        fitted = copy.copy(self)  # the same table, standardised over this fit's classes
        fitted.standardize_on = list(class_names if fit_on is None else fit_on)
        return fitted.vectors(class_names, fit_on)

    def cache_config(self) -> dict[str, Any]:
        config = {"table": self.table, "categorical": self.categorical, "numeric": self.numeric,
                  "numeric_weight": self.numeric_weight}
        # only when set: the vectors cached without it keep their key
        return config if self.standardize_on is None else {**config, "standardize_on": self.standardize_on}

    def columns(self) -> list[str]:
        """Names of the vector's columns, e.g. `reed=double`, `range_low`."""
        return encode_attribute_table(self.table, self.categorical, self.numeric)[1]

    def dim_hint(self) -> str:
        users: dict[str, list[str]] = {}
        for name, row in self.table.items():
            for attribute in self.categorical:
                for value in dict.fromkeys(_values(row[attribute])):
                    users.setdefault(f"{attribute}={value}", []).append(name)
        once = [f"side_info.table.{names[0]}.{column}" for column, names in users.items()
                if len(names) == 1]
        return (f" If side_info.dim={self.dim} is right, a misspelt value adds a column: check "
                f"the values only one class uses, {once}.") if once else ""

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class one (1, dim) row: its encoded attributes (`columns`)."""
        check_covered(class_names, list(self.table), what="side_info.table",
                      hint="Add a row for each to side_info.table (a value for every "
                           "categorical and numeric attribute), or remove the class from "
                           "dataset.split.")
        rows = list(class_names) if self.standardize_on == TRAIN_CLASSES else self.standardize_on
        vectors, _ = encode_attribute_table(self.table, self.categorical, self.numeric,
                                            self.numeric_weight, rows)
        return [vectors[name][None] for name in class_names]
