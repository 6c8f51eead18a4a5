"""Side information for zero-shot learning: one vector (or a few) per class name."""
