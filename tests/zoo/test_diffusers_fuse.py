"""diffusers' fuse_qkv_projections() and svdtune: fusing after apply is detected, fusing first works."""

from __future__ import annotations

import warnings

import pytest
import torch

import svdtune

pytest.importorskip("diffusers")
from zoo_models import BY_NAME  # noqa: E402

pytestmark = pytest.mark.zoo
UNET = BY_NAME["unet2d"]


def gradients(model) -> dict[str, bool]:
    UNET.forward(model, UNET.batch(model)).square().sum().backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in model.named_parameters() if n.endswith("svd_delta")}


def test_fusing_after_apply_is_detected():
    model = svdtune.apply(UNET.build(0), ["to_q", "to_k", "to_v", "to_out.0"])
    model.fuse_qkv_projections()  # builds plain to_qkv / to_kv layers from W', fully trainable
    with pytest.warns(RuntimeWarning, match=r"created or unfrozen after svdtune.apply.*fuse first, then apply"):
        svdtune.trainable_parameters(model)
    reached = gradients(model)
    assert not all(reached.values())  # what the warning is about: to_k/to_v deltas are bypassed


def test_fusing_first_then_applying_trains_every_delta():
    model = UNET.build(0)
    model.fuse_qkv_projections()
    before = UNET.forward(model, UNET.batch(model)).detach()
    svdtune.apply(model, ["to_qkv", "attn2.to_q", "to_kv", "to_out.0"])  # the layers the fused attention uses
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        svdtune.trainable_parameters(model)
    with torch.no_grad():
        assert torch.equal(UNET.forward(model, UNET.batch(model)), before)
    reached = gradients(model)
    assert reached and all(reached.values()), reached
