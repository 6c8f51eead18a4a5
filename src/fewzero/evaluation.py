"""Few-shot evaluation on embeddings computed once: episodes become index arithmetic.

Evaluating a backbone in eval mode per episode or once per clip gives identical prototypes
(BatchNorm uses running statistics; GroupNorm is per sample), so each clip is embedded once
and every episode reuses the embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import scipy.stats
import torch

from fewzero.data.episodes import EpisodeIndices, EpisodeSampler
from fewzero.models.protonet import Distance, WithinClassWhitening
from fewzero.threads import one_thread
from fewzero.zsl_evaluation import confusion_matrix


@dataclass
class EpisodeResults:
    """Per-episode accuracies of one protocol, plus an instrument confusion matrix.

    Attributes:
        accuracies: (n_episodes,) query accuracy of each episode.
        confusion: (n_classes, n_classes) counts, rows = true class id, cols = predicted id,
            over all queries of all episodes (ids as in the sampler's labels).
    """

    accuracies: torch.Tensor
    confusion: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean: Student's t with n - 1 degrees
        of freedom (1.962 at 1000 episodes, as the normal 1.96; 2.776 at 5, where 1.96 would
        understate the interval by 30%)."""
        n = self.accuracies.numel()
        if n < 2:
            return float("nan")
        t = float(scipy.stats.t.ppf(0.975, n - 1))
        return t * float(self.accuracies.std(unbiased=True)) / math.sqrt(n)


@torch.no_grad()
def evaluate_episodes(embeddings: torch.Tensor, sampler: EpisodeSampler, n_episodes: int,
                      distance: Distance, n_classes: int,
                      whitening: WithinClassWhitening | None = None,
                      episodes: Sequence[EpisodeIndices] | None = None) -> EpisodeResults:
    """Run `n_episodes` prototypical episodes on precomputed embeddings.

    Args:
        embeddings: (n_clips, dim), indexed like the sampler's labels (rows of clips outside the
            sampler's classes are never read); un-whitened when `whitening` is given.
        sampler: draws the episodes (its seed fixes them).
        distance: the trained distance (its learned scale does not change the argmax).
        n_classes: size of the confusion matrix.
        whitening: a fitted whitening applied to every episode, adapted to each episode's
            support set when it `adapts` at the sampler's shot count.
        episodes: the sampler's first `n_episodes` episodes, drawn already (callers that score
            the same episodes several times draw them once); None draws them here.
    """
    per_episode = whitening is not None and whitening.adapts(sampler.n_shot)
    if whitening is not None:
        embeddings = (embeddings @ whitening.adaptation_basis().to(embeddings) if per_episode
                      else whitening(embeddings))
    accuracies = torch.empty(n_episodes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    with one_thread():
        for i in range(n_episodes):
            ep = sampler.episode(i) if episodes is None else episodes[i]
            n_way, n_query = ep.query.shape
            support, queries = embeddings[ep.support], embeddings[ep.query.flatten()]
            if per_episode:
                adapted = whitening.adapt(support.flatten(0, 1),  # (n_way * n_shot, dim), class-major
                                          torch.arange(n_way).repeat_interleave(ep.support.shape[1]))
                support, queries = adapted(support), adapted(queries)
            # the support is balanced and class-major: a plain mean. `class_prototypes` (index_add)
            # sums in another order from about 20 shots on, so it would round differently and
            # change the reported accuracies.
            prototypes = support.mean(dim=1)  # (n_way, dim)
            logits = distance(queries, prototypes)  # (n_way*n_query, n_way)
            predicted = logits.argmax(dim=1).cpu()
            truth = torch.arange(n_way).repeat_interleave(n_query)
            accuracies[i] = (predicted == truth).float().mean()
            class_ids = sampler.class_ids[ep.classes]
            confusion += confusion_matrix(class_ids[predicted], class_ids[truth], n_classes)
    return EpisodeResults(accuracies, confusion)
