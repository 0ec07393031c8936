"""diffusers interop: local diffusers folders as denoisers (`load_diffusers`, also reached through
`difflab.load`) and `DifflabScheduler`, difflab's solvers as a diffusers scheduler (imported on
first use: it needs diffusers itself)."""
from difflab.interop.diffusers.loader import is_diffusers_folder, load_diffusers

__all__ = ["DifflabScheduler", "is_diffusers_folder", "load_diffusers"]


def __getattr__(name: str):
    if name == "DifflabScheduler":
        from difflab.interop.diffusers.scheduler import DifflabScheduler
        return DifflabScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
