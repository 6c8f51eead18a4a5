"""A pitch-range prior for zero-shot scores: what note a clip plays, against each class's range.

Pitch is a property of the note, not of the instrument, so a pitch classifier learnt on the seen
classes' training clips (their metadata pitch) transfers to unseen instruments, unlike a class
posterior. Each class's documented playing range (the attribute table's `range_low` /
`range_high`, organology facts written before any audio was seen) then gives a likelihood of the
clip under that class: uniform over its range, a small floor outside it. The model's class
scores get `weight * log p(clip's pitch | class)` added at evaluation: with `weight` = the
InfoNCE temperature this is the Bayes combination of the trained softmax posterior and the range
likelihood (the two taken as independent evidence); no test data sets it. With
`weight_candidates`, validation data choose each evaluation setting's weight instead
(`choose_weight`).

With `formants` (a `FormantLikelihood`) the same sum over pitches also weighs where the clip's
spectrum peaks against each class's documented main formant: a resonance of the instrument's
body that stays at one frequency whatever note is played, so it too is a property that a
measurement of the audio can check on an instrument no training clip came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewzero.data.clips import check_covered
from fewzero.data.features import MelFeatures, midi_to_hz


class FormantLikelihood(nn.Module):
    """p(spectral peak | pitch, class) from each class's documented main-formant band.

    The observation is the frequency of the loudest mel band of a clip's time-averaged power
    spectrum (`spectral_peaks`). A note of fundamental f0 has energy only at harmonics k * f0, so
    under class c (main formant band [lo, hi] Hz) the peak is expected at the harmonic nearest
    the band (the fundamental when the band lies below f0). In log frequency the density is flat
    over the band stretched to reach that harmonic, with Laplace tails of `scale` on either side:

        log g = -d / scale - log(2 * scale + width),   d = distance of log(peak) to that interval

    Classes whose table row has no formant (`formant_low` / `formant_high`) get the mean of the
    densities of the training classes' documented bands (`fit_scale` names them): their formant
    is taken to be any of those. Never an unseen class's band: its table row is test-time side
    information, which must not move the scores validation and class cross-validation read.

    Args:
        table: class name -> row; rows with `formant_low` and `formant_high` (Hz) are documented.
        features: the log-mel settings of the clips, to name each mel band's frequency.
        scale: Laplace scale in natural-log frequency; None: fitted by maximum likelihood on the
            training clips (`fit_scale`, called by the zero-shot module in `setup`).
        max_harmonic: highest harmonic considered when looking for the one nearest a band.
    """

    def __init__(self, table: Mapping[str, Mapping[str, Any]], features: MelFeatures,
                 scale: float | None = None, max_harmonic: int = 64):
        super().__init__()
        self.bands: dict[str, tuple[float, float]] = {}
        for name, row in dict(table).items():
            if "formant_low" not in row and "formant_high" not in row:
                continue
            low, high = float(row.get("formant_low", -1)), float(row.get("formant_high", -1))
            if not 0 < low <= high:
                raise ValueError(f"Class {name!r} needs 0 < formant_low <= formant_high (Hz) in the "
                                 f"table; got formant_low={row.get('formant_low')}, "
                                 f"formant_high={row.get('formant_high')}.")
            self.bands[name] = (low, high)
        if not self.bands:
            raise ValueError("pitch_prior.formants needs main-formant bands in the table (formant_low "
                             "and formant_high in Hz, as side_info=attributes has): none was found.")
        if scale is not None and scale <= 0:
            raise ValueError(f"pitch_prior.formants.scale must be positive or null; got {scale}.")
        self.fixed_scale = scale is not None
        self.max_harmonic = max_harmonic
        # documented training classes, whose bands stand for an undocumented class (`fit_scale`)
        self.fallback: list[str] | None = None
        self.register_buffer("scale", torch.tensor(float(scale) if scale is not None else float("nan")))
        self.register_buffer("mel_centres_hz", features.mel_centres_hz().float(), persistent=False)

    def spectral_peaks(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) natural-log mel power -> (batch,) frequency (Hz) of the mel band
        with the most power averaged over the frames."""
        if log_mel.ndim != 3 or log_mel.shape[1] != len(self.mel_centres_hz):
            raise ValueError(f"Expected log-mel excerpts (batch, {len(self.mel_centres_hz)}, frames) "
                             f"for the formant likelihood; got {tuple(log_mel.shape)}.")
        return self.mel_centres_hz[log_mel.exp().mean(dim=2).argmax(dim=1)]

    def _band_distance(self, log_peaks: torch.Tensor, log_f0: torch.Tensor, band: tuple[float, float]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """For one band: log_peaks (n,), log_f0 (n_pitches,) -> (distance of each log peak to the
        interval expected at each pitch (n, n_pitches), that interval's width (n_pitches,))."""
        low, high = math.log(band[0]), math.log(band[1])
        harmonics = log_f0[:, None] + torch.arange(1, self.max_harmonic + 1, dtype=log_f0.dtype,
                                                   device=log_f0.device).log()  # (n_pitches, K)
        outside = (low - harmonics).clamp_min(0) + (harmonics - high).clamp_min(0)
        nearest = harmonics.gather(1, outside.argmin(dim=1, keepdim=True))[:, 0]  # (n_pitches,)
        start, end = nearest.clamp(max=low), nearest.clamp(min=high)
        distance = ((start[None] - log_peaks[:, None]).clamp_min(0)
                    + (log_peaks[:, None] - end[None]).clamp_min(0))
        return distance, end - start

    @staticmethod
    def _laplace(distance: torch.Tensor, width: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Log density of the flat-topped Laplace: distance (...), width broadcastable."""
        return -distance / scale - torch.log(2 * scale + width)

    def log_density(self, peaks: torch.Tensor, pitches: torch.Tensor, class_names: Sequence[str]
                    ) -> torch.Tensor:
        """log p(peak | pitch, class) at the fitted or configured scale.

        Args:
            peaks: (n,) spectral peaks in Hz; pitches: (n_pitches,) MIDI numbers.
            class_names: the classes to score.
        Returns:
            (n, n_pitches, n_classes), float64.
        """
        scale = self.scale.double()
        if bool(torch.isnan(scale)):
            raise RuntimeError("The formant likelihood's scale is not fitted yet: call fit_scale on "
                               "training clips or set model.pitch_prior.formants.scale.")
        undocumented = [name for name in class_names if name not in self.bands]
        if undocumented and self.fallback is None:
            raise RuntimeError(f"{undocumented} have no documented formant: they get the mean density "
                               "of the training classes' formants, which fit_scale names; call it "
                               "on the training clips first.")
        if undocumented and not self.fallback:
            raise ValueError(f"{undocumented} have no documented formant (formant_low, formant_high) "
                             "and no training class has one to stand for them: give them formants "
                             "in the table, or train on a class that has one.")
        log_peaks, log_f0 = peaks.double().log(), midi_to_hz(pitches).log()
        needed = dict.fromkeys([*class_names, *(self.fallback if undocumented else [])])
        documented = {name: self._laplace(*self._band_distance(log_peaks, log_f0, self.bands[name]), scale)
                      for name in needed if name in self.bands}
        unknown = (torch.stack([documented[name] for name in self.fallback]).logsumexp(dim=0)
                   - math.log(len(self.fallback))) if undocumented else None
        return torch.stack([documented.get(name, unknown) for name in class_names], dim=-1)

    @torch.no_grad()
    def fit_scale(self, peaks: torch.Tensor, pitches: torch.Tensor, classes: Sequence[str]) -> float:
        """Maximum-likelihood Laplace scale on training clips of documented classes and known pitch.

        Args: peaks (n,) Hz, pitches (n,) metadata MIDI numbers (-1 unknown), classes: n names.
        Keeps a scale given in the config. Returns the scale used. Records the documented classes
        among `classes` as those whose bands stand for an undocumented class (`log_density`).
        """
        self.fallback = sorted(set(classes) & self.bands.keys())
        if self.fixed_scale:
            return float(self.scale)
        keep = [i for i, (name, pitch) in enumerate(zip(classes, pitches.tolist(), strict=True))
                if name in self.bands and pitch >= 0]
        if not keep:
            raise ValueError("No training clip of a class with a documented formant and a known pitch: "
                             "the formant likelihood's scale cannot be fitted. Set "
                             "model.pitch_prior.formants.scale.")
        distances, widths = [], []
        for name in sorted({classes[i] for i in keep}):
            clips = torch.tensor([i for i in keep if classes[i] == name])
            own, column = pitches[clips].unique(return_inverse=True)  # each clip at its own pitch
            distance, width = self._band_distance(peaks[clips].double().log(), midi_to_hz(own).log(),
                                                  self.bands[name])
            distances.append(distance.gather(1, column[:, None])[:, 0])
            widths.append(width[column])
        candidates = torch.logspace(-2.5, 0.5, 121, dtype=torch.float64)[:, None]
        totals = self._laplace(torch.cat(distances)[None], torch.cat(widths)[None], candidates).sum(dim=1)
        self.scale.fill_(float(candidates[totals.argmax()]))
        return float(self.scale)


SETTINGS = ("zsl", "seen", "gzsl")  # evaluation settings, each with its own weight of the prior
# how validation may score a candidate ZSL weight -> what the score is, in words (plots)
ZSL_SCORES = {"top1": "pseudo-unseen per-class top-1",
              "log_likelihood": "pseudo-unseen per-class log-likelihood"}


def best_candidate(candidates: Sequence[float], scores: Sequence[float], a_priori: float) -> float:
    """The candidate weight with the highest score (one score per candidate); among equally good
    ones the closest to `a_priori` (then the smaller)."""
    best = max(scores)
    tied = [w for w, v in zip(candidates, scores, strict=True) if v == best]
    return min(tied, key=lambda w: (abs(w - a_priori), w))


def all_tied(scores: Sequence[float]) -> bool:
    """Every candidate scored the same (one pseudo-unseen class: ZSL among one candidate is
    always right): validation chose nothing, and `best_candidate` keeps the a-priori weight's."""
    return len(set(scores)) == 1


class PitchRangePrior(nn.Module):
    """Pitch head on the audio embedding + per-class playing ranges.

    Args:
        audio_dim: size of the audio embedding the pitch head reads.
        table: class name -> a row with `range_low` and `range_high` (MIDI numbers, sounding
            pitch), e.g. `${side_info.table}` of the attribute table.
        low_pitch, high_pitch: MIDI span of the pitch head's classes; training pitches outside
            it, and unknown ones (-1), are ignored.
        loss_weight: weight of the pitch cross-entropy added to the training loss.
        weight: scale of the log-likelihood added to the head's scores at evaluation, in every
            setting unless validation chooses otherwise (`weights`, a buffer saved with each
            checkpoint, holds the weight of each of `SETTINGS`).
        weight_candidates: optional weights to choose from on validation data, for each setting
            by its own validation score (`choose_weight`, called by `ZeroShotModule`); None keeps
            `weight` everywhere. Each candidate's last validation score is kept in the buffer
            `validation_scores` (len(SETTINGS), n_candidates), saved with each checkpoint.
        zsl_score: how validation scores a candidate ZSL weight on the pseudo-unseen clips:
            "top1" (per-class mean top-1) or "log_likelihood" (per-class mean log-probability of
            the right class at the best temperature, `true_class_log_likelihood`: the weight of
            the two experts' log-linear combination fitted by maximum likelihood).
        class_cv: choose the ZSL weight by class cross-validation: `fewzero.train` trains one
            more model for every extra set of pseudo-unseen classes of the split
            (`dataset.split.pseudo_unseen_folds`) and takes the candidate with the best
            `zsl_score` averaged over all folds (`choose_from_scores`). Needs `weight_candidates`.
        in_training: also add `weight` * the log-likelihood to the head's training scores (a
            product of experts, as at evaluation): the head then learns what the prior does not
            already explain. The prior's term carries no gradient.
        floor: likelihood mass a class gives to a pitch outside its range (relative to one
            in-range pitch), so a slightly out-of-range or mis-estimated note is not ruled out.
        detach: train the pitch head on a detached embedding (a probe; the encoder learns only
            from the zero-shot loss).
        formants: optional `FormantLikelihood`: the clip's spectral peak is then weighed against
            each class's main formant at every pitch of the sum (see `log_likelihood`).
    """

    def __init__(self, audio_dim: int, table: Mapping[str, Mapping[str, Any]] | None, low_pitch: int = 21,
                 high_pitch: int = 108, loss_weight: float = 1.0, weight: float = 0.1,
                 floor: float = 0.01, detach: bool = False, formants: FormantLikelihood | None = None,
                 weight_candidates: Sequence[float] | None = None, class_cv: bool = False,
                 in_training: bool = False, zsl_score: str = "top1"):
        super().__init__()
        if not low_pitch < high_pitch:
            raise ValueError(f"model.pitch_prior.low_pitch ({low_pitch}) must be below high_pitch "
                             f"({high_pitch}).")
        candidates = list(weight_candidates) if weight_candidates is not None else None
        # (written so that nan fails too: nan < 0 is false, and nan weights gave nan scores)
        if not (weight >= 0 and loss_weight >= 0 and 0 < floor < 1
                and all(c >= 0 for c in candidates or [])):
            raise ValueError("model.pitch_prior needs weight >= 0 (weight_candidates too), "
                             "loss_weight >= 0 and 0 < floor < 1; got "
                             f"weight={weight}, loss_weight={loss_weight}, floor={floor}, "
                             f"weight_candidates={candidates}.")
        if candidates is not None and not candidates:
            raise ValueError("model.pitch_prior.weight_candidates is empty: give weights or null.")
        if zsl_score not in ZSL_SCORES:
            raise ValueError(f"model.pitch_prior.zsl_score must be one of {list(ZSL_SCORES)}; got "
                             f"{zsl_score!r}.")
        if class_cv and candidates is None:
            raise ValueError("model.pitch_prior.class_cv chooses among weight_candidates: give them "
                             "(e.g. [0.0,0.1,0.4,1.6]) or set class_cv=false.")
        if table is None:
            raise ValueError("model.pitch_prior needs each class's playing range: use "
                             "side_info=attributes (its table has range_low/range_high), "
                             "model/pitch_prior=range_formant_attributes (the table beside another "
                             "side information) or set model.pitch_prior.table to {class name: "
                             "{range_low: MIDI, range_high: MIDI}}.")
        self.ranges = {name: (int(row["range_low"]), int(row["range_high"]))
                       for name, row in dict(table).items()
                       if "range_low" in row and "range_high" in row}
        self.low_pitch, self.high_pitch = int(low_pitch), int(high_pitch)
        self.loss_weight, self.floor, self.detach = loss_weight, floor, detach
        self.weight, self.weight_candidates, self.class_cv = float(weight), candidates, bool(class_cv)
        self.in_training, self.zsl_score = bool(in_training), zsl_score
        self.register_buffer("weights", torch.full((len(SETTINGS),), float(weight)))
        self.register_buffer("validation_scores", torch.full((len(SETTINGS), len(candidates or [])),
                                                             float("nan"), dtype=torch.float64))
        self.pitch_head = nn.Linear(audio_dim, self.high_pitch - self.low_pitch + 1)
        self.formants = formants

    def choose_weight(self, setting: str, score: Callable[[float], float]) -> float:
        """The candidate weight with the highest validation `score` for one of `SETTINGS`
        (every candidate's score is kept in `validation_scores`); ties as `choose_from_scores`."""
        if not self.weight_candidates:
            raise ValueError("pitch_prior.weight_candidates is not set: nothing to choose from.")
        scores = torch.tensor([score(w) for w in self.weight_candidates], dtype=torch.float64)
        self.validation_scores[SETTINGS.index(setting)] = scores
        return self.choose_from_scores(scores)

    def choose_from_scores(self, scores: torch.Tensor) -> float:
        """The candidate weight with the highest score, (n_candidates,) in `weight_candidates`'
        order; among equally good ones the closest to the configured `weight` (then the
        smaller): where validation cannot tell the candidates apart (one pseudo-unseen class
        makes ZSL top-1 1.0 for all), the a-priori weight stays."""
        if not self.weight_candidates or scores.shape != (len(self.weight_candidates),):
            raise ValueError(f"Need one score per weight candidate ({self.weight_candidates}); got "
                             f"shape {tuple(scores.shape)}.")
        if bool(scores.isnan().any()):
            raise ValueError(f"Validation scores of the prior's weights contain NaN: {scores.tolist()}")
        return best_candidate(self.weight_candidates, scores.tolist(), self.weight)

    def weight_for(self, setting: str) -> float:
        """The weight of the prior in one of `SETTINGS` ("zsl", "seen", "gzsl")."""
        return float(self.weights[SETTINGS.index(setting)])

    @property
    def pitches(self) -> torch.Tensor:
        """(n_pitches,) the MIDI numbers of the pitch head's classes, low_pitch .. high_pitch."""
        return torch.arange(self.low_pitch, self.high_pitch + 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, n_pitches) pitch logits (low_pitch .. high_pitch)."""
        return self.pitch_head(audio.detach() if self.detach else audio)

    def predicted_pitches(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch,) the most probable MIDI pitch of every clip."""
        return self(audio).argmax(dim=1) + self.low_pitch

    def loss(self, audio: torch.Tensor, pitches: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy of the pitch head. pitches: (batch,) MIDI numbers, -1 unknown."""
        targets = pitches - self.low_pitch
        targets = targets.masked_fill((pitches < self.low_pitch) | (pitches > self.high_pitch), -100)
        if bool((targets < 0).all()):
            return audio.new_zeros(())  # no known pitch in this batch
        return self.loss_weight * F.cross_entropy(self(audio), targets, ignore_index=-100)

    def range_likelihoods(self, class_names: Sequence[str]) -> torch.Tensor:
        """(n_classes, n_pitches): p(pitch | class), uniform over the class's range plus the floor.

        Raises a ValueError naming the classes that have no range in the table.
        """
        check_covered(class_names, list(self.ranges), what="The range table of model.pitch_prior",
                      hint="Give each a row with range_low and range_high (MIDI) in the table "
                           "model.pitch_prior.table points to: side_info.table with "
                           "side_info=attributes, physical_facts.table with "
                           "model/pitch_prior=range_formant_attributes (a row of ranges and "
                           "formants is enough there, e.g. '+physical_facts.table={Piccolo: "
                           "{range_low: 74, range_high: 108}}'), or remove the class from "
                           "dataset.split.")
        pitches = self.pitches
        inside = torch.stack([(pitches >= self.ranges[n][0]) & (pitches <= self.ranges[n][1])
                              for n in class_names]).float()
        if bool((inside.sum(dim=1) == 0).any()):
            empty = [n for n, row in zip(class_names, inside, strict=True) if not row.any()]
            raise ValueError(f"The ranges of {empty} lie outside pitch_prior's span "
                             f"{self.low_pitch}..{self.high_pitch}: widen low_pitch/high_pitch.")
        likelihood = inside + self.floor
        return likelihood / likelihood.sum(dim=1, keepdim=True)

    def formant_log_densities(self, peaks: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """(n,) spectral peaks (Hz, from `formants.spectral_peaks`) -> (n, n_pitches, n_classes)
        log p(peak | pitch, class) over the pitch head's span."""
        if self.formants is None:
            raise ValueError("This pitch prior has no formant likelihood (model.pitch_prior.formants).")
        return self.formants.log_density(peaks, self.pitches.to(peaks.device), class_names)

    def log_likelihood(self, audio: torch.Tensor, ranges: torch.Tensor,
                       formant_densities: torch.Tensor | None = None) -> torch.Tensor:
        """log p(clip | class) through its pitch: log sum_p p(p | clip) p(p | class), and with
        formant densities log sum_p p(p | clip) p(p | class) p(peak | p, class).

        Args:
            audio: (batch, audio_dim) embeddings; ranges: (n_classes, n_pitches) from
                `range_likelihoods`; formant_densities: (batch, n_pitches, n_classes) from
                `formant_log_densities`, or None.
        Returns:
            (batch, n_classes).
        """
        if formant_densities is None:
            return (self(audio).softmax(dim=1) @ ranges.T).clamp_min(1e-12).log()
        joint = (self(audio).log_softmax(dim=1)[:, :, None].double() + ranges.T.double().log()[None]
                 + formant_densities)
        return joint.logsumexp(dim=1).to(audio.dtype)

    def adjust(self, scores: torch.Tensor, audio: torch.Tensor, ranges: torch.Tensor,
               formant_densities: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, n_classes) head scores + the configured weight * `log_likelihood`."""
        return scores + self.weight * self.log_likelihood(audio, ranges, formant_densities)
