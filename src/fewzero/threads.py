"""torch's intra-op thread count for small linear algebra."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside (restored after), for small tensors.

    An episode's tensors are tiny (tens of rows): waking a second thread for each op costs more
    than the op, and far more when another process holds the other core (episode scores are
    bit-identical to 2 threads': every op there is far below ATen's parallel grain size). MKL's
    eigen-decomposition of the whitening's 256 x 256 covariance took 0.35-0.68 s on 2 threads
    beside other processes against 0.02-0.03 s on one (2 cores, session 37).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
