"""Image grids: the labelled grid is the plain grid beside a margin that holds one label per row."""
import numpy as np
import pytest
import torch
from PIL import Image

from difflab.apps.figures import save_image_grid


def _images(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1     # [N, 1, 8, 8] in [−1, 1]


def test_row_labels_add_a_left_margin_and_leave_the_grid_unchanged(tmp_path):
    x = _images(6)
    plain = np.asarray(Image.open(save_image_grid(x, tmp_path / "plain.png", ncol=3)))
    labelled = np.asarray(Image.open(save_image_grid(x, tmp_path / "labelled.png", ncol=3,
                                                     row_labels=["first row", "second"])))
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and margin > 20        # wider by the text's width
    assert np.array_equal(labelled[:, margin:], plain)
    row_height = plain.shape[0] // 2
    for row in range(2):                                               # each row's label is drawn beside it
        assert (labelled[row * row_height:(row + 1) * row_height, :margin] < 128).any()


def test_row_labels_must_match_the_rows(tmp_path):
    with pytest.raises(ValueError, match="3 row labels for a grid of 2 rows"):
        save_image_grid(_images(6), tmp_path / "grid.png", ncol=3, row_labels=["a", "b", "c"])
    assert not (tmp_path / "grid.png").exists()
