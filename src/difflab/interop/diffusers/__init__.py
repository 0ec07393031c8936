"""diffusers interop: local diffusers folders as denoisers (`load_diffusers`, also reached through
`difflab.load`) and `DifflabScheduler`, difflab's solvers as a diffusers scheduler (imported on
first use: it needs diffusers itself)."""
# the student format first: `difflab.load` tries formats in registration order, and a student folder is
# also a diffusers folder (guided-distillation students: student.py)
from difflab.interop.diffusers.student import (  # isort: skip
    load_diffusers_student,
    make_diffusers_student,
    save_diffusers_student,
)
from difflab.interop.diffusers.loader import is_diffusers_folder, load_diffusers  # isort: skip
from difflab.interop.diffusers.text_to_image import TextToImageDenoiser  # isort: skip

__all__ = ["DifflabScheduler", "TextToImageDenoiser", "is_diffusers_folder", "load_diffusers", "make_diffusers_student",
           "save_diffusers_student", "load_diffusers_student"]


def __getattr__(name: str):
    if name == "DifflabScheduler":
        from difflab.interop.diffusers.scheduler import DifflabScheduler
        return DifflabScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
