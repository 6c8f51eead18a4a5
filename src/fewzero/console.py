"""What Lightning and torch print that says nothing to a fewzero user, kept off the console.

Four kinds:
- Lightning's advertisement for its cloud logger, printed by every Trainer;
- torch 2.11's FutureWarning about `LeafSpec`, raised inside Lightning's own code;
- for the trainers that follow a run's main fit (class cross-validation's folds, the refit),
  the device lines the main trainer has already printed, and "Checkpoint directory ... exists
  and is not empty": those fits write into the run's own checkpoint folder by design;
- in the fits of a model that optimises nothing (a closed-form head on a frozen encoder: ESZSL,
  SAE), Lightning's warnings that `configure_optimizers` and `training_step` returned None, as
  they do by design there.

Everything else Lightning says is left as it is.

And fewzero's own refusals of bad input (`refusal_message`): their message names the problem and
the fix, so a single run prints that alone, not behind a traceback of fewzero's and Lightning's
frames.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra.errors import ConfigCompositionException, OverrideParseException

# where Lightning's rank_zero_info goes (pytorch_lightning's, and lightning_fabric's)
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
ADVERTISEMENT = "💡 Tip:"
DEVICE_LINES = ("GPU available", "TPU available", "HPU available", "IPU available")
PACKAGE_DIR = Path(__file__).resolve().parent
# the kinds of exception fewzero raises for bad input (a config, a path, a missing package)
REFUSALS = (ValueError, FileNotFoundError, RuntimeError, ImportError)


# what a DDP process's collective call raises when another process has ended (gloo; NCCL)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def stopped_by_another_process(error: BaseException, rank: int) -> bool:
    """Whether `error` is a DDP process (rank > 0) finding that another process has ended, e.g.
    the first one, refused bad input: its traceback would follow, and hide, that message."""
    return rank > 0 and isinstance(error, RuntimeError) and any(s in str(error) for s in PEER_GONE)


def unwrapped(error: BaseException) -> BaseException:
    """The error that OmegaConf or Hydra met while resolving or building the config (a
    resolver's, a class's refusal), which they raise inside their own; `error` itself when it
    is none of theirs."""
    while type(error).__module__.startswith(("omegaconf.", "hydra.")) and (
            error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    return error


def refusal_message(error: BaseException, own_code: Sequence[Path] = ()) -> str | None:
    """The message of `error` when it is one of fewzero's refusals of bad input: a REFUSALS
    exception raised by a `raise` statement in fewzero's own code (its innermost frame), also
    inside the error of OmegaConf or Hydra that met it (a config resolver's refusal). None
    otherwise (a library's error, or one a fewzero line met without raising it on purpose,
    such as int("x"), a `raise NotImplementedError` of a base class whose method a plugin left
    out, or one without a message): those keep their traceback. None too with HYDRA_FULL_ERROR=1, which asks
    for every traceback. `own_code`: further folders whose `raise` statements refuse bad input
    (a script's own, scripts/)."""
    error = unwrapped(error)
    if (os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(error, REFUSALS)
            or isinstance(error, NotImplementedError) or not str(error)):
        # NotImplementedError (a RuntimeError) is a method a subclass left out, not bad input,
        # and a message-less error has nothing to print without its traceback
        return None
    frame = error.__traceback__
    if frame is None:
        return None
    while frame.tb_next is not None:
        frame = frame.tb_next
    path = Path(frame.tb_frame.f_code.co_filename).resolve()
    line = linecache.getline(str(path), frame.tb_lineno).strip()
    ours = any(folder.resolve() in path.parents for folder in (PACKAGE_DIR, *own_code))
    return str(error) if ours and line.startswith("raise ") else None


def command_refusal(error: BaseException, own_code: Sequence[Path] = ()) -> str | None:
    """What a command (`fewzero.eval`, a script of scripts/) prints instead of `error` and its
    traceback: a refusal's message (`refusal_message`), a missing file's (FileNotFoundError,
    wherever raised: a path the command line names), or Hydra's for a config it cannot compose
    (an unknown experiment, a key the config lacks: `fewzero.train` prints those alone too).
    None for anything else, a bug, which keeps its traceback, and with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if isinstance(error, FileNotFoundError | ConfigCompositionException | OverrideParseException):
        return str(error) or None
    return refusal_message(error, own_code)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Lightning's advertisement, and its note that a model summary callback was given (fewzero.train
# gives its own in place of Lightning's default: `fewzero.callbacks.EncoderModelSummary`)
_ADVERTISEMENT_FILTER = DropMessages((ADVERTISEMENT, "Trainer already configured with model summary"))


def quiet_lightning() -> None:
    """Drop Lightning's advertisement (and note on a given model summary) and torch's LeafSpec
    notice for the whole process (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _ADVERTISEMENT_FILTER not in logger.filters:
            logger.addFilter(_ADVERTISEMENT_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


# what Lightning warns of in a fit whose model optimises nothing (`without_optimiser_notes`)
NO_OPTIMISER_NOTES = (r"`LightningModule.configure_optimizers` returned `None`",
                      r"`training_step` returned `None`")


@contextlib.contextmanager
def without_optimiser_notes(optimises_nothing: bool) -> Iterator[None]:
    """Around a fit: when its model optimises nothing (`optimises_nothing`: a closed-form head on a
    frozen encoder, whose `configure_optimizers` and `training_step` return None by design),
    Lightning's warnings of those two Nones are dropped. Every other warning, and those two for
    any other model, are left as they are."""
    with warnings.catch_warnings():
        if optimises_nothing:
            for note in NO_OPTIMISER_NOTES:
                warnings.filterwarnings("ignore", message=note, category=UserWarning)
        yield


@contextlib.contextmanager
def follow_up_trainer() -> Iterator[None]:
    """Around building and running a trainer that follows the run's main fit: its device lines
    and the warning about the run's own, non-empty checkpoint folder are dropped."""
    device_filter = DropMessages(DEVICE_LINES)
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(device_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(device_filter)
