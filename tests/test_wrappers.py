"""Wrapped models (torch.compile, DataParallel) and buffers that training changes outside the delta."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import svdtune
from tests.conftest import randomize_deltas


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("wrap", [lambda m: torch.compile(m, backend="eager"), nn.DataParallel], ids=["compile", "dataparallel"])
def test_a_delta_saved_from_a_wrapper_fits_the_plain_model(wrap, tmp_path):
    base = mlp()
    inner = copy.deepcopy(base)
    wrapped = wrap(inner) if wrap is not nn.DataParallel else None
    if wrapped is None:  # DataParallel is wrapped after apply, as training code does
        svdtune.apply(inner, targets=["0", "2"])
        wrapped = nn.DataParallel(inner)
    else:
        assert svdtune.apply(wrapped, targets=["0", "2"]) is wrapped
    randomize_deltas(inner, seed=1)
    assert [row.name for row in svdtune.report(wrapped).rows][:2] == ["0", "2"]
    svdtune.save_delta(wrapped, tmp_path / "task.safetensors")
    assert sorted(svdtune.read_delta(tmp_path / "task.safetensors").layers) == ["0", "2"]
    plain = svdtune.load_delta(copy.deepcopy(base), tmp_path / "task.safetensors")
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(plain(x), inner(x))
    assert svdtune.merge(wrapped) is wrapped
    assert sorted(inner.state_dict()) == sorted(base.state_dict())


def test_apply_refuses_a_model_already_wrapped_for_data_parallel():
    base = mlp()
    wrapped = nn.DataParallel(copy.deepcopy(base))
    with pytest.raises(svdtune.SvdtuneError, match="call apply on the model first, then wrap it"):
        svdtune.apply(wrapped, targets=["0"])
    assert all(type(m) is type(n) for m, n in zip(wrapped.module.modules(), base.modules()))
    assert all(p.requires_grad for p in wrapped.parameters())


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def train_steps(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(svdtune.trainable_parameters(model), lr=0.01)
    for _ in range(steps):
        model(torch.randn(5, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_save_delta_warns_when_frozen_batchnorm_statistics_drifted(tmp_path):
    model = svdtune.apply(bn_model(), targets=["0", "4"])
    train_steps(model.train())
    with pytest.warns(RuntimeWarning, match=r"1\.running_mean.*keep frozen BatchNorm layers in eval mode"):
        svdtune.save_delta(model, tmp_path / "task.safetensors")


@pytest.mark.parametrize("setup", ["batchnorm-in-eval", "batchnorm-trainable", "moved-to-bfloat16"])
def test_no_warning_when_the_delta_holds_everything_that_changed(setup, tmp_path):
    model = svdtune.apply(bn_model(), targets=["0", "4"], trainable=["1"] if setup == "batchnorm-trainable" else ())
    if setup == "moved-to-bfloat16":
        model.to(torch.bfloat16)  # the statistics are rounded, not trained
    else:
        model.train()
        if setup == "batchnorm-in-eval":
            model[1].eval()
        train_steps(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdtune.save_delta(model, tmp_path / "task.safetensors")


@pytest.mark.parametrize("wrap", [lambda m: torch.compile(nn.DataParallel(m), backend="eager"),
                                  lambda m: nn.DataParallel(torch.compile(m, backend="eager"))],
                         ids=["compile(DataParallel)", "DataParallel(compile)"])
def test_apply_refuses_data_parallel_anywhere_in_the_wrappers(wrap):
    inner = mlp()
    with pytest.raises(svdtune.SvdtuneError, match="wrapped in DataParallel"):
        svdtune.apply(wrap(inner), targets=["0"])
    assert all(p.requires_grad for p in inner.parameters()) and not hasattr(inner[0], "svd_delta")


def test_a_model_with_a_meta_buffer_can_be_adapted_and_saved(tmp_path):
    model = mlp()
    model.register_buffer("placeholder", torch.empty(10, device="meta"))
    svdtune.apply(model, targets=["0"])
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["0.svd_delta"]
    svdtune.save_delta(model, tmp_path / "task.safetensors")


def test_the_statistics_of_a_batchnorm_without_affine_inside_a_trainable_head_are_saved(tmp_path):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4, affine=False))
    base = nn.Sequential(OrderedDict(body=nn.Linear(6, 8), act=nn.ReLU(), head=head))
    model = svdtune.apply(copy.deepcopy(base), targets=["body"], trainable=["head"])
    model.train()
    model(torch.randn(16, 6)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdtune.save_delta(model, tmp_path / "task.safetensors")
    assert "head.1.running_mean" in svdtune.read_delta(tmp_path / "task.safetensors").buffers
    reloaded = svdtune.load_delta(copy.deepcopy(base), tmp_path / "task.safetensors")
    assert torch.equal(reloaded.head[1].running_mean, model.head[1].running_mean)


def test_buffer_warnings_name_the_buffer_from_the_saved_model_and_ignore_unchanged_nan(tmp_path):
    model = nn.Sequential(nn.Identity(), bn_model())
    model[1].register_buffer("missing", torch.tensor([float("nan")]))
    svdtune.apply(model[1], targets=["0", "4"])  # adapted as a submodule, saved from the parent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdtune.save_delta(model, tmp_path / "task.safetensors")  # NaN == NaN here: nothing changed
    train_steps(model.train())
    with pytest.warns(RuntimeWarning, match=r"\['1\.1\.running_mean'"):
        svdtune.save_delta(model, tmp_path / "task.safetensors")
