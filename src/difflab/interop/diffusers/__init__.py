"""diffusers interop: local diffusers folders as denoisers (`load_diffusers`, also reached through
`difflab.load`) and `DifflabScheduler`, difflab's solvers as a diffusers scheduler (imported on
first use: it needs diffusers itself)."""
from difflab.interop.diffusers.loader import is_diffusers_folder, load_diffusers
from difflab.interop.diffusers.student import load_diffusers_student, make_diffusers_student, save_diffusers_student
from difflab.interop.diffusers.text_to_image import TextToImageDenoiser

__all__ = ["DifflabScheduler", "TextToImageDenoiser", "is_diffusers_folder", "load_diffusers", "make_diffusers_student",
           "save_diffusers_student", "load_diffusers_student"]


def __getattr__(name: str):
    if name == "DifflabScheduler":
        from difflab.interop.diffusers.scheduler import DifflabScheduler
        return DifflabScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
