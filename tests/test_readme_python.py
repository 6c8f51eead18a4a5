"""README's "From Python (notebooks)" snippet. Running it trains on the default data for minutes,
so here its calls run with `train` and `evaluate` standing in: its configs compose for real, and
its evaluation's settings apply to its run's config."""

import logging
import re
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import fewzero.eval
import fewzero.train
from fewzero.eval import apply_overrides

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The Python code block of README's "From Python (notebooks)" section."""
    section = README.read_text().split("## From Python (notebooks)\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_snippet_composes_its_runs_and_its_evaluation(tmp_path, monkeypatch):
    trained: list[tuple[DictConfig, str | None]] = []
    evaluated: list[tuple[str, list[str], str]] = []
    checkpoint = str(tmp_path / "best.ckpt")

    def train(cfg):
        assert isinstance(cfg, DictConfig)
        trained.append((OmegaConf.to_container(cfg), cfg.get("ckpt_path")))
        return defaultdict(float, {"test/checkpoint": checkpoint}), {"cfg": cfg}

    def evaluate(ckpt_path, overrides, output_dir):
        evaluated.append((ckpt_path, overrides, output_dir))
        # the evaluation's settings apply to the first run's config, as fewzero.eval applies them
        tested = apply_overrides(OmegaConf.create(trained[0][0]), overrides)
        assert [dict(t) for t in tested.dataset.episodes.test] == [
            {"n_way": 3, "n_shot": 5, "n_query": 15, "n_episodes": 200}]
        return defaultdict(float), {}

    monkeypatch.setattr(fewzero.train, "train", train)
    monkeypatch.setattr(fewzero.eval, "evaluate", evaluate)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # pytest's handlers stay
    monkeypatch.chdir(tmp_path)
    exec(readme_snippet(), {})

    (fsl, first), (zsl, _), (again, resumed) = trained
    assert fsl["paths"]["output_dir"] == "outputs/notebook/fsl_seed0" and fsl["seed"] == 0
    assert fsl["trainer"]["max_steps"] == 6 and first is None  # debug=fast
    assert zsl["model"]["_target_"] == "fewzero.models.zeroshot_module.ZeroShotModule"
    assert zsl["paths"]["output_dir"] == "outputs/notebook/zsl_attribute"
    assert resumed == "auto" and again == {**fsl, "ckpt_path": "auto"}
    assert evaluated == [(checkpoint, evaluated[0][1], "outputs/notebook/fsl_seed0_3way")]
