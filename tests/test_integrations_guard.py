"""The save_pretrained warning (svdtune.integrations.guard) and the trainable-since-apply warning,
on plain torch models: no third-party library needed."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import svdtune

MESSAGE = "save_pretrained of a model with svdtune layers"


class Pretrained(nn.Sequential):
    """Stands in for a library model whose save_pretrained writes its state dict."""

    def save_pretrained(self) -> dict:
        return self.state_dict()


def model() -> Pretrained:
    torch.manual_seed(0)
    return Pretrained(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def test_save_pretrained_of_an_adapted_model_warns():
    adapted = svdtune.apply(model(), ["0"])
    with pytest.warns(UserWarning, match=MESSAGE):
        state = adapted.save_pretrained()
    assert "0.svd_delta" in state  # what the warning says gets written


def test_save_pretrained_of_a_merged_or_restored_model_and_plain_state_dicts_do_not_warn():
    adapted = svdtune.apply(model(), ["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted.state_dict()  # torch.save, DDP, checkpoints: unchanged
        svdtune.merge(adapted).save_pretrained()
        restored = svdtune.restore(svdtune.apply(model(), ["2"]))
        restored.save_pretrained()


def test_the_guard_is_installed_once_and_survives_deepcopy_and_pickling(tmp_path):
    import copy
    adapted = svdtune.apply(model(), ["0"])
    svdtune.apply(adapted, ["2"])
    assert len(adapted._state_dict_pre_hooks) == 1
    torch.save(adapted, tmp_path / "m.pt")
    for other in (copy.deepcopy(adapted), torch.load(tmp_path / "m.pt", weights_only=False)):
        with pytest.warns(UserWarning, match=MESSAGE):
            other.save_pretrained()


def test_load_delta_into_a_plain_model_installs_the_guard(tmp_path):
    svdtune.save_delta(svdtune.apply(model(), ["0"]), tmp_path / "d.safetensors")
    loaded = svdtune.load_delta(model(), tmp_path / "d.safetensors")
    with pytest.warns(UserWarning, match=MESSAGE):
        loaded.save_pretrained()


def test_parameters_created_or_unfrozen_after_apply_warn():
    adapted = svdtune.apply(model(), ["0"], trainable=["2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(svdtune.trainable_parameters(adapted)) == 3  # delta, 2.weight, 2.bias
    adapted.add_module("extra", nn.Linear(2, 2))  # as diffusers' fuse_qkv_projections() adds to_qkv
    with pytest.warns(RuntimeWarning, match=r"2 trainable parameters were created or unfrozen.*'extra.weight'"):
        svdtune.trainable_parameters(adapted)
    del adapted.extra
    adapted[0].bias.requires_grad_(True)  # apply froze it
    with pytest.warns(RuntimeWarning, match=r"1 trainable parameters.*'0.bias'"):
        svdtune.trainable_parameters(adapted)


def test_import_svdtune_imports_no_third_party_integration():
    code = ("import sys, svdtune; bad = [m for m in ('transformers', 'diffusers', 'peft', "
            "'svdtune.integrations.transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
