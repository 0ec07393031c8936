"""One exception type per kind of mistake.

Every message says what was given, what was expected and how to fix it. All derive from
`DifflabError`, which the CLI turns into one line on stderr and exit status 2.
"""


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
