"""A small CNN for the 8x8 digits, trained on the spot: class scores and features for Fréchet distance.

Trained once on the digits train split (fixed seed, a few seconds on CPU), cached as safetensors
under `<cache>/digit_classifier/` (cache = `cache_dir`, `$DIFFLAB_CACHE` or `~/.cache/difflab`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from difflab.core.errors import ConfigError, ShapeError
from difflab.data.digits import DIGITS_NUM_TEST, load_digits
from difflab.metrics.distances import frechet_distance

CONFIG = {"format": "difflab.digit_classifier", "version": 1, "channels": [32, 64],
          "feature_dim": 128, "num_classes": 10, "seed": 0, "epochs": 8, "batch_size": 50,
          "learning_rate": 3e-3}
_EVAL_BATCH = 1024


class DigitClassifier(nn.Module):
    """conv 32 – conv 64 – max-pool – linear 128 (features) – linear 10, for x [N, 1, 8, 8] in [-1, 1]."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(channels[1] * 4 * 4, feature_dim),
        )
        # features are taken before this ReLU: no dead units, so their covariance has full rank
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 8, 8] -> logits [N, 10]."""
        return self.head(self.body(x))

    @torch.no_grad()
    def _batched(self, module: nn.Module, x) -> torch.Tensor:
        was_training = self.training
        self.eval()
        images = _as_digit_images(x)
        outputs = torch.cat([module(images[i:i + _EVAL_BATCH]) for i in range(0, len(images), _EVAL_BATCH)])
        self.train(was_training)
        return outputs

    def features(self, x) -> torch.Tensor:
        """Penultimate pre-activations: x [N, 1, 8, 8] (or [N, 64]) -> [N, 128] float32, CPU."""
        return self._batched(self.body, x)

    def class_probs(self, x) -> torch.Tensor:
        """Softmax class probabilities: x [N, 1, 8, 8] -> [N, 10]."""
        return self._batched(self, x).softmax(dim=1)

    def accuracy(self, x, labels) -> float:
        """Fraction of x [N, 1, 8, 8] whose most probable class equals labels [N]."""
        labels = torch.as_tensor(labels).cpu().reshape(-1)
        predicted = self.class_probs(x).argmax(dim=1)
        if len(predicted) != len(labels):
            raise ShapeError(f"{len(predicted)} images but {len(labels)} labels; expected one label each.")
        return float((predicted == labels).double().mean())


def _as_digit_images(x) -> torch.Tensor:
    """[N, 1, 8, 8], [N, 8, 8] or [N, 64] tensor/array -> [N, 1, 8, 8] float32 CPU."""
    images = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if images.dim() < 2 or images[0].numel() != 64:
        raise ShapeError(
            f"Digit images have shape {tuple(images.shape)}; expected [N, 1, 8, 8] (or [N, 64]) "
            "in [-1, 1], as from difflab.data.load_digits()."
        )
    return images.reshape(-1, 1, 8, 8)


def _shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction, filling with background (-1)."""
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


@contextlib.contextmanager
def _single_thread():
    """Run on one intra-op thread: for a net this small, more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_single_thread()
def train_digit_classifier(config: dict = CONFIG) -> DigitClassifier:
    """Train on the digits train split with Adam and one-pixel shifts; deterministic given config."""
    train = load_digits("train")
    generator = torch.Generator().manual_seed(config["seed"])
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching global state
        torch.manual_seed(config["seed"])
        model = DigitClassifier(tuple(config["channels"]), config["feature_dim"], config["num_classes"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    steps_per_epoch = -(-len(train) // config["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config["learning_rate"],
                                                   total_steps=config["epochs"] * steps_per_epoch)
    model.train()
    for _ in range(config["epochs"]):
        for batch in torch.randperm(len(train), generator=generator).split(config["batch_size"]):
            loss = nn.functional.cross_entropy(model(_shift_augment(train.x[batch], generator)),
                                               train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab"
    return Path(root).expanduser().resolve() / "digit_classifier"


def save_digit_classifier(model: DigitClassifier, folder: Path, config: dict) -> None:
    """Write model.safetensors, then config.json (so a config always has its weights), atomically."""
    from safetensors.torch import save_file

    from difflab.core.io import atomic_path, write_json

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as temp:
        save_file(state, temp)
    write_json(folder / "config.json", config)


def load_digit_classifier(folder: Path) -> DigitClassifier:
    """Load a cached classifier; ConfigError if it is missing, corrupt or from another version."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text())
        if {k: config.get(k) for k in CONFIG} != CONFIG:
            raise ValueError(f"config {config} differs from the current {CONFIG}")
        model = DigitClassifier(tuple(config["channels"]), config["feature_dim"], config["num_classes"])
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ConfigError(
            f"Cannot use the cached digit classifier in {str(folder)!r} ({error}); delete that "
            "folder to retrain it."
        ) from error
    return model.eval()


@functools.lru_cache(maxsize=None)
def _classifier_in(folder: Path) -> DigitClassifier:
    if (folder / "config.json").is_file():
        try:
            return load_digit_classifier(folder)
        except ConfigError as error:  # a stale or broken cache is rebuilt, not fatal
            warnings.warn(f"{error} Retraining it now.", stacklevel=3)
    start = time.perf_counter()
    model = train_digit_classifier(CONFIG)
    test = load_digits("test")
    record = {**CONFIG, "train_seconds": round(time.perf_counter() - start, 2),
              "test_accuracy": model.accuracy(test.x, test.labels)}
    try:
        save_digit_classifier(model, folder, record)
    except OSError as error:  # a read-only cache costs a retrain next session, nothing more
        warnings.warn(f"Could not cache the digit classifier in {str(folder)!r} ({error}); set "
                      "DIFFLAB_CACHE to a writable folder to keep it.", stacklevel=3)
    return model


def get_digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The digits classifier: from the in-process memo, else the disk cache, else trained now.

    cache_dir: cache root (default `$DIFFLAB_CACHE`, else ~/.cache/difflab); the model lives in
    `<cache_dir>/digit_classifier/` as model.safetensors + config.json. The returned model is
    shared; do not train it further.
    """
    return _classifier_in(_cache_folder(cache_dir))


def digits_frechet(samples, reference=None, classifier: DigitClassifier | None = None) -> float:
    """Fréchet distance between samples [N, 1, 8, 8] and reference [M, 1, 8, 8] in classifier features.

    reference defaults to the held-out digits (test split, 297 images). The value depends on N
    (small sets inflate it): compare a model's score with `digits_frechet_floor(N)`, real digits
    scored the same way at the same N.
    """
    classifier = get_digit_classifier() if classifier is None else classifier
    reference = load_digits("test").x if reference is None else reference
    return frechet_distance(classifier.features(samples), classifier.features(reference))


def digits_frechet_floor(n: int | None = None, classifier: DigitClassifier | None = None) -> float:
    """The real-data floor of `digits_frechet`: n real training digits against the held-out split.

    The first n images of the (fixed, permuted) train split, scored with `digits_frechet` against
    the 297 test images they never overlap with; n defaults to 297 and may be up to 1,500. A model's
    `digits_frechet(samples)` for n samples is to be compared with this floor at the same n: a
    perfect sampler scores about the floor, not 0.
    """
    train = load_digits("train")
    n = DIGITS_NUM_TEST if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(train):
        raise ConfigError(
            f"n={n!r}; expected an int from 2 to {len(train)} (the size of the digits train split)."
        )
    return digits_frechet(train.x[:n], None, classifier)
