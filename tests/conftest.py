import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when pytest runs notebooks in subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def small_cnn():
    """A tiny CNN exercising conv, in-place activation, pooling, flatten and linear layers."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ELU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 5),
    ).eval()


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the images it is given: checks the one-pass forward budget."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)
