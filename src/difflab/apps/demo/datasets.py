"""The image data sets `difflab demo` runs on (`--data`): per data set, the base U-Net recipe and its sizes.

The image sections read the data set from the demo's `base` dict: base["data"] is an ImageData (its
name is what difflab.data and difflab.metrics know it by), base[data.name] the trained base denoiser
and base[f"{data.name}_dir"] its folder. Without base["data"] a section runs on the digits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from difflab.core.errors import UnknownNameError

DIGITS_UNET = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4]}
DIGITS_STEPS, DIGITS_BATCH = 500, 128  # the default recipe (benchmarks/train_digits.py measures it)
# the MNIST bench U-Net (benchmarks/mnist_models.py, 2.9 M parameters) and the digits cU-Net pairing scaled to
# 28×28 (benchmarks/nets.py: widths 16/32/64, attention at the two lowest resolutions)
MNIST_UNET = {"base_channels": 32, "channel_mults": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [7],
              "image_size": 28}
MNIST_CUNET = {"base_channels": 16, "channel_mults": [1, 2, 4], "attn_resolutions": [14, 7], "embed_dim": 128,
               "image_size": 28}
MNIST_STEPS, MNIST_BATCH = 300, 64      # about 2 s a step on one busy CPU core: 10–15 minutes


@dataclass(frozen=True)
class ImageData:
    """One image data set of the demo and its base-model recipe (the digits recipe, scaled to the images)."""

    name: str                        # difflab.data.get_dataset / difflab.metrics name
    title: str                       # how the report names it
    shape: tuple[int, int, int]      # one image: [C, H, W]
    unet: dict                       # the base U-Net (UNet keyword arguments)
    train_steps: tuple[int, int]     # base training steps: (quick, full)
    batch_size: int
    n_samples: tuple[int, int]       # base samples scored by the Fréchet distance: (quick, full)
    cunet: dict = field(default_factory=dict)   # the cU-Net compared with the U-Net (CUNet keyword arguments)

    def load(self, split: str):
        """The `split` ("train", "test") as a difflab.data.Dataset: x [N, *shape] in [-1, 1], labels [N]."""
        from difflab.data import get_dataset

        return get_dataset(self.name, split=split)

    def steps(self, quick: bool) -> int:
        return self.train_steps[0 if quick else 1]

    def samples(self, quick: bool) -> int:
        return self.n_samples[0 if quick else 1]


DIGITS = ImageData("digits", "digits", (1, 8, 8), DIGITS_UNET, (200, DIGITS_STEPS), DIGITS_BATCH, (297, 1000))
MNIST = ImageData("mnist", "MNIST", (1, 28, 28), MNIST_UNET, (40, MNIST_STEPS), MNIST_BATCH, (100, 1000),
                  cunet=MNIST_CUNET)
IMAGE_DATA = {data.name: data for data in (DIGITS, MNIST)}


def image_data(name: str) -> ImageData:
    """The ImageData called `name` ("digits", "mnist"); UnknownNameError naming the known ones."""
    if name not in IMAGE_DATA:
        raise UnknownNameError(f"The demo has no data set {name!r}; expected one of {', '.join(IMAGE_DATA)}.")
    return IMAGE_DATA[name]


def image_base(base: dict) -> tuple[ImageData, object]:
    """(the data set, its base denoiser or None) of the demo's `base` dict (digits when it names none)."""
    data = base.get("data", DIGITS)
    return data, base.get(data.name)
