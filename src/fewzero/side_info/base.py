"""The one interface every side-information source implements, and its on-disk cache.

A source turns class names into vectors: `source.vectors(class_names)` returns a
`ClassVectors` whose `mean` is (n_classes, dim). Sources with several vectors per class
(images) keep them all in `members`, so a model can sample one per training step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewzero.data.clips import config_hash, replace_atomically, write_error
from fewzero.data.features import load_cache

log = logging.getLogger(__name__)


@dataclass
class ClassVectors:
    """Side information of an ordered list of classes.

    Attributes:
        names: class names, length n_classes.
        members: per class a (n_i, dim) tensor of its vectors (n_i = 1 for words, text, attributes).
        normalized: the members are L2-normalised, and so is `mean`.
    """

    names: list[str]
    members: list[torch.Tensor]
    normalized: bool = False

    @property
    def mean(self) -> torch.Tensor:
        """(n_classes, dim): the average vector of every class (what prediction uses), of unit
        length when the members are (an average of several unit vectors is shorter, and would
        scale down the scores of its class; a single member is kept as it is, to the bit)."""
        return torch.stack([
            torch.nn.functional.normalize(m.mean(dim=0), dim=0) if self.normalized and len(m) > 1
            else m.mean(dim=0) for m in self.members])

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n_classes, dim): one randomly chosen member vector per class."""
        picks = [int(torch.randint(len(m), (1,), generator=generator)) for m in self.members]
        return torch.stack([m[i] for m, i in zip(self.members, picks, strict=True)])


_NOT_CACHED: set[Path] = set()  # caches this process could not write, and said so


class SideInformation:
    """Base class: subclasses implement `compute` and `cache_config`; `vectors` caches them.

    Args:
        dim: the vector size, as written in the config (models are sized by `${side_info.dim}`);
            checked against what the source produces.
        cache_dir: where vectors are cached (`<cache_dir>/side_info/<kind>-<hash>.pt`); None
            disables caching.
        center: subtract the mean class vector of the training classes (`vectors`' `fit_on`)
            from every class's before normalising. Spreads out vectors that share a large common
            component, as GloVe vectors of instrument names do. The mean is the training classes'
            only, so that no held-out class's side information (a test class's, or a
            pseudo-unseen one's in validation) shapes the vectors a model trains on.
        normalize: L2-normalise every vector (the usual ZSL practice; scale-free comparisons).
        sample_per_step: train on one randomly drawn member vector per class and step instead of
            the class mean (only matters for sources with several vectors per class).
    """

    kind = "side_info"

    def __init__(self, dim: int, cache_dir: str | Path | None = None, center: bool = False,
                 normalize: bool = True, sample_per_step: bool = False):
        self.dim, self.center, self.normalize = int(dim), center, normalize
        self.sample_per_step = sample_per_step
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class a (n_i, dim) float tensor. Raise a ValueError naming any unknown class."""
        raise NotImplementedError

    def cache_config(self) -> dict[str, Any]:
        """Everything that determines the vectors (besides the class names), JSON-serialisable."""
        raise NotImplementedError

    def cache_path(self, class_names: Sequence[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = config_hash({"kind": self.kind, "classes": list(class_names),
                           "config": self.cache_config(), "version": 1})
        return self.cache_dir / "side_info" / f"{self.kind}-{key}.pt"

    def vectors(self, class_names: Sequence[str], fit_on: Sequence[str] | None = None) -> ClassVectors:
        """Side information of `class_names`, computed once and cached on disk.

        `fit_on`: the classes a model trains on (a subset of `class_names`; None: all of them).
        Every statistic taken over classes comes from them alone: the mean that `center`
        subtracts, and a source's own (the attribute table's standardisation)."""
        unknown = sorted(set(fit_on or ()) - set(class_names))
        if unknown:
            raise ValueError(f"fit_on names classes that are not among the requested ones: {unknown}")
        path = self.cache_path(class_names)
        cached = path is not None and path.exists()
        if cached:
            members = load_cache(path, f"{self.kind} side information")
        else:
            members = [m.float() for m in self.compute(class_names)]
        self._check_dim(members)  # on every load, and before caching: nothing invalid is written
        unwritable = write_error(path.parent) if path is not None and not cached else None
        if unwritable is not None:  # a shared data folder made read-only: the vectors are cheap
            if path not in _NOT_CACHED:
                log.info("%s side information of %d classes is not cached, as %s cannot be "
                         "written (%s): each run computes it", self.kind, len(class_names),
                         path.parent, unwritable.strerror or unwritable)
            _NOT_CACHED.add(path)
        elif path is not None and not cached:
            replace_atomically(path, lambda tmp: torch.save(members, tmp))
            log.info("Cached %s side information of %d classes to %s", self.kind,
                     len(class_names), path)
        if self.center:
            centres = set(class_names if fit_on is None else fit_on)
            mean = torch.stack([m.mean(dim=0) for name, m in zip(class_names, members, strict=True)
                                if name in centres]).mean(dim=0)
            members = [m - mean for m in members]
        if self.normalize:
            members = [torch.nn.functional.normalize(m, dim=1) for m in members]
        return ClassVectors(list(class_names), members, normalized=self.normalize)

    def _check_dim(self, members: list[torch.Tensor]) -> None:
        found = {int(m.shape[1]) for m in members}
        if found != {self.dim}:
            raise ValueError(f"{self.kind} side information has dimension {sorted(found)} but the "
                             f"config says side_info.dim={self.dim}. Set side_info.dim="
                             f"{min(found)} (models are sized from it).{self.dim_hint()}")

    def dim_hint(self) -> str:
        """What else may explain vectors of a size other than side_info.dim: '' or a sentence
        that starts with a space (appended to the mismatch error)."""
        return ""
