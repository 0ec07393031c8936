"""`difflab demo`, the main job: one module per report section and the HTML report writer (`run`)."""
from difflab.apps.demo.run import run_demo

__all__ = ["run_demo"]
