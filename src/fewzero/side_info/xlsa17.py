"""Class attributes of an xlsa17 dataset (`att` of att_splits.mat) as side information."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fewzero.data.clips import file_digest
from fewzero.data.xlsa17 import SPLIT_FILE, load_splits
from fewzero.side_info.base import SideInformation

log = logging.getLogger(__name__)


def attribute_dim(name: str, dims: Mapping[str, int]) -> int:
    """The attribute count of xlsa17 dataset `name` from `dims` (the config's table), for the
    `${xlsa17_dim:${dataset.name},${side_info.dims}}` resolver that sizes models before any file is
    read. A name the table lacks (misspelt, or a folder of one's own) is a ValueError that says to
    fix the spelling or to give the size."""
    if name not in dims:
        raise ValueError(f"dataset.name={name} is none of xlsa17's datasets {list(dims)} (names are "
                         f"case-sensitive), so the size of its attribute vectors is unknown: fix the "
                         f"spelling, or for a folder of your own in the same format pass side_info.dim=<"
                         f"its number of attributes> (the rows of att in {name}/{SPLIT_FILE}).")
    return int(dims[name])


class Xlsa17Attributes(SideInformation):
    """One attribute vector per class, read from `<root>/<name>/att_splits.mat`.

    Args:
        root, name: as `dataset.root` / `dataset.name` (the configs interpolate them).
        attribute_key: `att` (L2-normalised per class, what the paper uses) or `original_att`
            (the raw values: only with `normalize=False`, since normalising each class's vector
            gives `att` again; warned).
        dims: attribute count per dataset name, so configs can size models before any file is read
            (`dim: ${xlsa17_dim:${dataset.name},${side_info.dims}}`, see `attribute_dim`).
        dim: the size of this dataset's vectors (checked against the file).
    """

    kind = "xlsa17_attributes"

    def __init__(self, root: str | Path, name: str, attribute_key: str = "att",
                 dims: Mapping[str, int] | None = None, dim: int = 0, **kwargs: Any):
        super().__init__(dim, **kwargs)
        self.root, self.name, self.attribute_key = Path(root), name, attribute_key
        if attribute_key != "att" and self.normalize:
            log.warning("side_info.attribute_key=%s with side_info.normalize=true: each class's vector "
                        "is scaled to unit length, which makes xlsa17's original_att the same as its "
                        "att; add side_info.normalize=false for the raw values.", attribute_key)

    def cache_config(self) -> dict[str, Any]:
        # the file's contents, not only its path: a file replaced in place must not be reused
        path = self.root / self.name / SPLIT_FILE
        return {"root": str(self.root.resolve()), "name": self.name, "key": self.attribute_key,
                "md5": file_digest(path) if path.is_file() else None}

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class one (1, n_attributes) row of att_splits.mat's `attribute_key`."""
        splits = load_splits(self.root, self.name, None, attribute_key=self.attribute_key)
        return [splits.attributes[i][None] for i in splits.ids(list(class_names))]
