"""Figures users would rather look at than numbers: episode embeddings, confusion matrices,
validation sweeps."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import PIL.Image

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from fewzero.data.episodes import EpisodeSampler  # noqa: E402
from fewzero.models.pitch_prior import all_tied  # noqa: E402


def _pca_2d(points: torch.Tensor) -> torch.Tensor:
    """(n, dim) -> (n, 2) projection on the first two principal components; a second column of
    zeros where there is one component only (a 1-d embedding, `embedding_dim=1`, or one point)."""
    centred = points - points.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T
    return torch.nn.functional.pad(projected, (0, 2 - projected.shape[1]))


def episode_embedding_figure(embeddings: torch.Tensor, sampler: EpisodeSampler,
                             class_names: Sequence[str], episode_ids: Sequence[int],
                             title: str) -> Figure:
    """One panel per episode: support (o), query (x) and prototypes (*) in 2-D PCA space.

    Args:
        embeddings: (n_clips, dim) embeddings indexed like the sampler's labels.
        class_names: name of every class id.
    """
    fig, axes = plt.subplots(1, len(episode_ids), figsize=(5 * len(episode_ids), 4.6),
                             squeeze=False)
    for ax, episode_id in zip(axes[0], episode_ids, strict=True):
        ep = sampler.episode(episode_id)
        n_way, n_shot = ep.support.shape
        support = embeddings[ep.support.flatten()]
        query = embeddings[ep.query.flatten()]
        # as `fewzero.evaluation` computes them (a balanced, class-major support: a plain mean)
        prototypes = support.view(n_way, n_shot, -1).mean(dim=1)
        xy = _pca_2d(torch.cat([support, query, prototypes]).float())
        s_xy, q_xy, p_xy = xy.split([support.shape[0], query.shape[0], n_way])
        colors = plt.get_cmap("tab10")
        for k in range(n_way):
            name = class_names[int(sampler.class_ids[ep.classes[k]])]
            c = colors(k % 10)
            ax.scatter(*s_xy[k * n_shot : (k + 1) * n_shot].T, color=c, marker="o", s=28,
                       label=name)
            n_query = ep.query.shape[1]
            ax.scatter(*q_xy[k * n_query : (k + 1) * n_query].T, color=c, marker="x", s=22,
                       alpha=0.7)
            ax.scatter(*p_xy[k], color=c, marker="*", s=260, edgecolors="black")
        ax.set_title(f"episode {episode_id}: o support, x query, * prototype", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


MAX_NAMED_CLASSES = 30  # beyond this, figures drop per-class text (xlsa17 has up to 717 classes)


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion matrix (rows: true, cols: predicted) of the classes that occur:
    a row per class with clips, a column per class with clips or predictions, so every row
    still sums to 1 when clips go to a class that has none (a seen class without test clips in
    the GZSL matrix).

    Up to MAX_NAMED_CLASSES classes every cell is annotated and named; beyond, a fixed-size
    heat map only."""
    has_clips, predicted = confusion.sum(dim=1) > 0, confusion.sum(dim=0) > 0
    rows = torch.nonzero(has_clips).flatten()
    cols = torch.nonzero(has_clips | predicted).flatten()
    matrix = confusion[rows][:, cols].float()
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    row_names = [class_names[int(i)] for i in rows]
    col_names = [class_names[int(i)] for i in cols]
    named = len(col_names) <= MAX_NAMED_CLASSES
    size = (1.1 * len(col_names) + 2.5, 1.0 * len(row_names) + 2) if named else (12, 10.5)
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="Blues")
    if named:
        for r in range(len(row_names)):
            for c in range(len(col_names)):
                value = float(matrix[r, c])
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 else "black")
        ax.set_xticks(range(len(col_names)), col_names, rotation=40, ha="right")
        ax.set_yticks(range(len(row_names)), row_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# classes k, k + 10, k + 20, ... share tab10's k-th hue (ten distinct ones, no two shades of
# one), told apart by their markers: (audio clip, class vector) for each group of ten classes
CLASS_MARKERS = (("o", "*"), ("s", "P"), ("^", "X"), ("D", "p"))


def zsl_embedding_figure(audio: torch.Tensor, labels: torch.Tensor, class_points: torch.Tensor,
                         class_names: Sequence[str], unseen_ids: Sequence[int], title: str) -> Figure:
    """Audio embeddings (small marks) and class vectors (large ones) in the shared space, 2-D PCA.
    Each class has its own colour and marker pair (CLASS_MARKERS); its legend entry shows both.

    Args:
        audio: (n, d) audio embeddings in the shared space.
        labels: (n,) class ids of the audio.
        class_points: (n_classes, d) class vectors mapped into the same space.
        unseen_ids: ids drawn with a black-edged class marker and "(unseen)" in the legend.
    """
    xy = _pca_2d(torch.cat([audio, class_points]).float())
    audio_xy, class_xy = xy.split([audio.shape[0], class_points.shape[0]])
    colors = plt.get_cmap("tab10")
    star = 320 if len(class_names) <= MAX_NAMED_CLASSES else 60
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    handles, names = [], []
    for c, name in enumerate(class_names):
        color, unseen = colors(c % 10), c in set(unseen_ids)
        audio_marker, class_marker = CLASS_MARKERS[c // 10 % len(CLASS_MARKERS)]
        points = audio_xy[labels == c]
        if len(points):
            ax.scatter(*points.T, color=color, marker=audio_marker, s=10, alpha=0.45, linewidths=0)
        edge = {"linewidths": 1.6, "edgecolors": "black"} if unseen else {"linewidths": 0.5,
                                                                          "edgecolors": "white"}
        ax.scatter(*class_xy[c], color=color, marker=class_marker, s=star, **edge)
        # legend: the class's audio mark (where it has clips), then its class-vector mark
        vector = Line2D([], [], color=color, marker=class_marker, linestyle="", markersize=11,
                        markeredgewidth=edge["linewidths"], markeredgecolor=edge["edgecolors"])
        clips = Line2D([], [], color=color, marker=audio_marker, linestyle="", markersize=4)
        handles.append((clips, vector) if len(points) else vector)
        names.append(f"{name} (unseen)" if unseen else name)
    ax.set_title(f"{title}\nsmall marks: audio clips, large: class vectors (black edge: unseen)",
                 fontsize=10)
    if len(class_names) <= MAX_NAMED_CLASSES:
        ax.legend(handles, names, handler_map={tuple: HandlerTuple(ndivide=None, pad=0.6)},
                  handlelength=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def weight_choice_figure(candidates: Sequence[float], fold_scores: torch.Tensor,
                         fold_names: Sequence[str], chosen: float, title: str,
                         score_name: str = "pseudo-unseen per-class top-1",
                         accuracy: bool = True) -> Figure:
    """Validation score (`score_name`) of every candidate weight, one line per fold and their
    mean (bold), with the chosen weight marked. fold_scores: (n_folds, n_candidates).
    `accuracy`: the score lies in [0, 1] (the y axis shows all of it); else y fits the scores.
    Where every candidate's mean ties, nothing was chosen: the figure says that the configured
    weight (`chosen`: the candidate closest to it) was kept."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = list(range(len(candidates)))  # evenly spaced: the candidates are roughly geometric
    for scores, name in zip(fold_scores.tolist(), fold_names, strict=True):
        ax.plot(x, scores, marker="o", alpha=0.6, label=name)
    mean = fold_scores.mean(dim=0)
    ax.plot(x, mean.tolist(), marker="o", color="black", linewidth=2.5, label="mean")
    tie = all_tied(mean.tolist())
    ax.axvline(list(candidates).index(chosen), color="red", linestyle="--",
               label=f"kept {chosen:g} (a tie)" if tie else f"chosen {chosen:g}")
    if tie:
        ax.text(0.5, 0.85, f"every weight scores {float(mean[0]):.4g}: validation cannot choose,\n"
                f"so the configured weight (or the candidate closest to it), {chosen:g}, was kept",
                transform=ax.transAxes,
                ha="center", va="center", fontsize=9, bbox={"facecolor": "white", "alpha": 0.9})
    ax.set_xticks(x, [f"{c:g}" for c in candidates])
    ax.set_xlabel("weight of the prior")
    ax.set_ylabel(score_name)
    if accuracy:  # show all of [0, 1]
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


PNG_COLOURSPACES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # TensorBoard's Summary.Image codes


def add_png(writer: Any, tag: str, png: bytes, step: int) -> None:
    """Add the encoded picture `png` to a TensorBoard writer as an image at `step`: as it is,
    into a torch SummaryWriter's event file, else (another logger's writer, Lightning's
    DummyExperiment under fast_dev_run) decoded for the writer's `add_image`."""
    with PIL.Image.open(io.BytesIO(png)) as image:  # the header only, unless decoded below
        if not isinstance(writer, SummaryWriter) or image.mode not in PNG_COLOURSPACES:
            pixels = np.asarray(image.convert("RGB"))  # (height, width, 3) uint8
            writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
            return
        picture = Summary.Image(height=image.height, width=image.width,
                                colorspace=PNG_COLOURSPACES[image.mode], encoded_image_string=png)
    # add_image's own route (its _get_file_writer), without its decoding and encoding
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), step)


def save_figure(figure: Figure, tag: str, plot_dir: Path | None, loggers: Sequence[Any],
                step: int) -> None:
    """Write `figure` as `<plot_dir>/<tag with / -> _>.png` and to every TensorBoard logger.

    The figure is drawn and encoded once, as that PNG (120 dpi, zlib level 1: a quarter larger
    than level 6, and half the encoding time); TensorBoard gets those very bytes. (Drawing it
    again for TensorBoard, then decoding the PNG for TensorBoard to encode it again, made
    plotting a large share of a short run's time.)"""
    writers = [experiment for experiment in (getattr(logger, "experiment", None) for logger in loggers)
               if hasattr(experiment, "add_image")]
    if plot_dir is not None or writers:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, pil_kwargs={"compress_level": 1})
        png = buffer.getvalue()
        if plot_dir is not None:
            plot_dir.mkdir(parents=True, exist_ok=True)
            (plot_dir / f"{tag.replace('/', '_')}.png").write_bytes(png)
        for writer in writers:
            add_png(writer, tag, png, step)
    plt.close(figure)
