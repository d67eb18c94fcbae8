"""Shared fixtures: a table of every supported layer kind with a matching input, and the oneDNN kernel for every size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdtune
from svdtune import kernels

# name -> (layer factory, input shape without batch)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 9), (12,)),
    "linear-3d-input": (lambda: nn.Linear(7, 10, bias=False), (4, 7)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (4, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (3, 8, 8)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"), (3, 7, 6)),
    "conv2d-groups-dilation": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), (4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1, padding_mode="circular"), (2, 4, 4, 4)),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(5, 3, 4, stride=2), (5, 6)),
    "convtranspose2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1), (4, 5, 5)),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 3, 3, 3)),
}


def make_layer(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    """A layer of kind ``name`` and a batch of 3 inputs for it, both seeded."""
    factory, shape = LAYERS[name]
    torch.manual_seed(seed)
    layer = factory().to(dtype)
    return layer, torch.randn(3, *shape, dtype=dtype)


def randomize_deltas(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every svd_delta random values (in place), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("svd_delta"):  # svd_delta, svd_delta_q_proj, ...
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(autouse=True)
def onednn_for_every_size(monkeypatch):
    """Route even the tests' small products through svdtune's oneDNN kernel (real models reach it
    only above kernels.MIN_MULTIPLY_ADDS), so every test covers the fast path too."""
    monkeypatch.setattr(kernels, "MIN_MULTIPLY_ADDS", 0)


@pytest.fixture
def svd_calls(monkeypatch):
    """One entry per SVD an adapted layer runs after apply (into its own factors, or for a swapped-in weight)."""
    calls = []
    original = svdtune.tracking.decompose_cached  # every SVD after apply goes through Tracking._decompose
    monkeypatch.setattr(svdtune.tracking, "decompose_cached",
                        lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1])
    return calls
