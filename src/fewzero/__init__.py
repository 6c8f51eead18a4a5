"""fewzero: few-shot and zero-shot musical instrument recognition with Lightning + Hydra."""

__version__ = "0.1.0"
