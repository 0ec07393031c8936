"""`difflab demo`, the main job: one module per report section and the HTML report writer (`run`)."""
from difflab.apps.demo.run import check_demo_folder, run_demo

__all__ = ["check_demo_folder", "run_demo"]
