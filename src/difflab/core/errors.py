"""One exception type per kind of mistake, and the warnings difflab gives.

Every message says what was given, what was expected and how to fix it. All errors derive from
`DifflabError`, which the CLI turns into one line on stderr and exit status 2. Warnings go through `warn`,
which points them at the user's line rather than at difflab's.
"""
import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep   # src/difflab/ (not a sibling named difflab_*)


class DifflabError(Exception):
    """Base class of every error difflab raises on purpose."""


class ShapeError(DifflabError, ValueError):
    """A tensor has the wrong shape, channel count or dtype for the model or algorithm."""


class SigmaRangeError(DifflabError, ValueError):
    """A noise level (or a time grid) lies outside what the model or solver accepts."""


class UnknownNameError(DifflabError, KeyError):
    """An unknown solver, grid, data set, network class or option name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ModelFormatError(DifflabError, ValueError):
    """A model folder is missing, corrupt, foreign, pickled or does not match its config."""


class AddonMismatchError(DifflabError, ValueError):
    """A learned add-on (AMED predictor, DEFT h-network, student) belongs to another base model."""


class NonFiniteError(DifflabError, FloatingPointError):
    """A model output or a solver state became NaN or infinite; says where."""


class ConfigError(DifflabError, ValueError):
    """Contradictory or invalid options (an NFE a solver cannot spend, a bad step count...)."""


class NotImprovedWarning(UserWarning):
    """A fit (an AMED predictor, a learned grid) is no better than its base on held-out noise; the base is what
    the fit returns ("never worse")."""


class DivergenceWarning(UserWarning):
    """A denoiser's logged training loss rose far above its best (training diverged): the model is likely
    broken."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn, attributed to the first caller outside the difflab package (the line of the user's
    code that started the work), however deep inside difflab the warning arose. Python 3.12's
    `skip_file_prefixes`, for 3.10 and 3.11."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
