"""Dense references for the layer-kind tests: merged weights computed independently of svdtune."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def reference_matrix(matrix: Tensor, delta: Tensor, mode: str = "shift", scale: float = 1.0) -> Tensor:
    """U diag(sigma') Vh of ``matrix`` (float64) by torch.linalg.svd, with the top k = len(delta) values changed."""
    U, sigma, Vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    k, step = delta.numel(), delta.detach().double() * scale
    new = sigma.clone()
    new[:k] = torch.relu(sigma[:k] + step) if mode == "shift" else sigma[:k] * (1 + step)
    return (U * new) @ Vh


def state(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state dict."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    """The model's state dict equals ``before`` bit for bit, with the same keys."""
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
