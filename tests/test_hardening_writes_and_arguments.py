"""Hardening found by a second adversarial review (issue 10): what load_delta may write, export_lora, arguments.

Each test failed on main at 4441c7f and says which promise it checks; they pass once the
library keeps it (a refusal with `SvdtuneError` where the promise allows one).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import svdtune


def small(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def trained_delta(tmp_path, seed: int = 0) -> tuple[str, str]:
    """(base.safetensors, delta.safetensors) of `small` with random deltas on layer "0"."""
    base, delta = str(tmp_path / "base.safetensors"), str(tmp_path / "delta.safetensors")
    model = small(seed)
    safetensors.torch.save_file(model.state_dict(), base)
    svdtune.apply(model, targets=["0"])
    with torch.no_grad():
        model[0].svd_delta.normal_()
    svdtune.save_delta(model, delta)
    return base, delta


def folder_content(folder) -> dict[str, bytes | None]:
    return {name: (open(os.path.join(folder, name), "rb").read() if os.path.isfile(os.path.join(folder, name)) else None)
            for name in sorted(os.listdir(folder))}


# load_delta into an adapted model: the file's "parameters" may name svdtune's own frozen factors.

def test_load_delta_refuses_parameters_that_are_svdtune_factors(tmp_path):
    """api.md load_delta: "Parameters stored in the file (from trainable modules) are copied into the model's
    parameters"; the factors U, sigma, Vh are svdtune's frozen internals, "never trained or saved"
    (walk.factor_ids). A file naming "0.svd_sigma" overwrote the sigma of an adapted layer and made it
    trainable: the training forward then changed (by ~70 here) while the cached no-grad forward and merge
    did not, a silently inconsistent model."""
    model = small()
    svdtune.apply(model, targets=["0"])
    path = str(tmp_path / "own.safetensors")
    svdtune.save_delta(model, path)
    hostile = dataclasses.replace(svdtune.read_delta(path), params={"0.svd_sigma": torch.full((5,), 100.0)})
    sigma = model[0].svd_sigma.detach().clone()
    with pytest.raises(svdtune.SvdtuneError):
        svdtune.load_delta(model, hostile)
    assert torch.equal(model[0].svd_sigma, sigma)
    assert not model[0].svd_sigma.requires_grad


# load_delta's transaction: a write that cannot succeed must be refused by the checks, before any change.

def test_load_delta_leaves_the_model_as_it_was_when_a_parameter_cannot_be_written(tmp_path):
    """api.md load_delta: "Raises SvdtuneError, with the model unchanged"; guide.md threat model: "the checks
    run before the model changes". A parameter whose elements share memory (an expand) made the copy fail
    inside the transaction, whose rollback then failed on the same copy: the error said "could not be rolled
    back" and every parameter stayed frozen (requires_grad changed by the half-done load)."""
    class WithExpanded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
            self.p = nn.Parameter(torch.zeros(1, 4).expand(3, 4))

        def forward(self, x):
            return self.head(self.fc(x)) + self.p.sum()

    torch.manual_seed(0)
    trained = WithExpanded()
    svdtune.apply(trained, targets=["fc"])
    with torch.no_grad():
        trained.fc.svd_delta.normal_()
    path = str(tmp_path / "delta.safetensors")
    svdtune.save_delta(trained, path)
    delta = dataclasses.replace(svdtune.read_delta(path), params={"p": torch.randn(3, 4)})
    torch.manual_seed(0)
    model = WithExpanded()  # the same base
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(svdtune.SvdtuneError) as error:
        svdtune.load_delta(model, delta)
    assert "could not be rolled back" not in str(error.value)
    assert [type(m) for m in model.modules()] == [WithExpanded, nn.Linear, nn.Linear]
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(values[name], p) for name, p in model.named_parameters())


# export_lora: "Raises SvdtuneError, with nothing written" (api.md export_lora).

def test_export_lora_writes_nothing_when_the_config_cannot_be_written(tmp_path):
    """A folder where adapter_config.json cannot be replaced (a folder of that name): the adapter file was
    written first and left there, so the folder held a new adapter_model.safetensors and no usable config."""
    base, delta = trained_delta(tmp_path)
    out = tmp_path / "lora"
    os.makedirs(out / "adapter_config.json")
    before = folder_content(out)
    with pytest.raises((svdtune.SvdtuneError, OSError)):
        svdtune.export_lora(delta, str(out), base=base)
    assert folder_content(out) == before


def test_export_lora_keeps_a_previous_export_whole_when_it_fails(tmp_path):
    """Exporting again into the folder of an earlier export (rank 1) whose config is read-only: the new
    adapter (rank 5) replaced the old one, then the config failed, leaving an adapter and a config of
    different ranks, which PEFT loads with the wrong scaling lora_alpha / r."""
    base, delta = trained_delta(tmp_path)
    out = str(tmp_path / "lora")
    svdtune.export_lora(delta, out, base=base, rank=1)
    os.chmod(os.path.join(out, "adapter_config.json"), 0o444)
    before = folder_content(out)
    with pytest.raises((svdtune.SvdtuneError, OSError)):
        svdtune.export_lora(delta, out, base=base)
    assert folder_content(out) == before


def test_export_lora_refuses_a_delta_whose_update_is_not_finite(tmp_path):
    """merge_files refuses this delta file ("merging layer '0' gives non-finite weights"); export_lora wrote
    it as a LoRA adapter of infinities (guide.md threat model: a delta file "cannot put NaN or infinity into
    your model"; api.md export_lora raises "everything merge_files raises")."""
    base, delta = trained_delta(tmp_path)
    record = svdtune.read_delta(delta)
    layer = record.layers["0"]
    hostile = str(tmp_path / "hostile.safetensors")
    huge = dataclasses.replace(layer, scale=1e38, delta=torch.full_like(layer.delta, 10.0))
    dataclasses.replace(record, layers={"0": huge}).save(hostile)
    with pytest.raises(svdtune.SvdtuneError):
        svdtune.merge_files(base, hostile, str(tmp_path / "merged.safetensors"))
    out = tmp_path / "lora"
    with pytest.raises(svdtune.SvdtuneError):
        svdtune.export_lora(hostile, str(out), base=base)
    assert not out.exists() or not os.listdir(out)


def test_export_lora_never_writes_factors_that_overflow_the_dtype(tmp_path):
    """dtype=torch.float16 with shifts of 1e10 (sqrt: 1e5 > float16's 65504): the factors were written as
    infinities without a word. An export either holds finite factors or is refused with an SvdtuneError."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    svdtune.apply(model, targets=["0"])
    with torch.no_grad():
        model[0].svd_delta.fill_(1e10)
    out = str(tmp_path / "lora")
    try:
        result = svdtune.export_lora(model, out, dtype=torch.float16)
    except svdtune.SvdtuneError:
        return
    tensors = safetensors.torch.load_file(result.files[0])
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


# report: "model: any model ... Raises: nothing of its own" (api.md report).

def test_report_of_a_model_with_a_lazy_module_not_yet_run():
    """A model with an nn.LazyLinear head not yet run: report raised torch's RuntimeError ("Can't access the
    shape of an uninitialized parameter") while counting the model's parameters."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    report = svdtune.report(model)
    assert str(report)


# The review's smaller findings, each the same class as a promise above.

def test_export_lora_refuses_an_out_dir_that_is_a_file_before_any_work(tmp_path, monkeypatch):
    base, delta = trained_delta(tmp_path)
    out = tmp_path / "lora"
    out.write_bytes(b"not a folder")
    monkeypatch.setattr(svdtune.lora, "_updates", lambda *a: pytest.fail("the export did its work first"))
    with pytest.raises(svdtune.SvdtuneError, match="is a file"):
        svdtune.export_lora(delta, str(out), base=base)
    assert out.read_bytes() == b"not a folder"


@pytest.mark.parametrize("prefix", ["a..b", "unet\n", ".unet", "unet."])
def test_export_lora_refuses_a_prefix_that_is_not_a_dotted_name(tmp_path, prefix):
    base, delta = trained_delta(tmp_path)
    with pytest.raises(svdtune.SvdtuneError, match="prefix"):
        svdtune.export_lora(delta, str(tmp_path / "lora"), base=base, format="diffusers", prefix=prefix)


def test_apply_and_load_refuse_a_model_with_a_lazy_module_before_any_change(tmp_path):
    _, delta = trained_delta(tmp_path)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LazyLinear(2))
    for action in (lambda: svdtune.apply(model, ["0"]), lambda: svdtune.load_delta(model, delta)):
        with pytest.raises(svdtune.SvdtuneError, match="'3.weight'.*lazy.*forward pass"):
            action()
        assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model[:3].parameters())


def test_set_scale_refuses_a_scale_that_overflows_a_weight_and_changes_nothing():
    model = svdtune.apply(small(), ["0", "2"])
    with torch.no_grad():
        model[2].svd_delta.fill_(1.0)
    with pytest.raises(svdtune.SvdtuneError, match="layer '0' overflow torch.float32"):
        svdtune.set_scale(model, 1e308)  # beyond float32 even times zero deltas (0 * inf is NaN)
    assert model[0].spectral_config.scale == model[2].spectral_config.scale == 1.0
    svdtune.set_scale(model, 1e30)  # W' entries up to ~1e30: finite in float32
    assert bool(torch.isfinite(model[2].weight).all())


def test_combine_refuses_a_single_path_for_its_list():
    with pytest.raises(svdtune.SvdtuneError, match="list of deltas"):
        svdtune.combine("a.safetensors", [1])


def test_a_delta_file_cannot_set_a_non_persistent_buffer(tmp_path):
    _, delta = trained_delta(tmp_path)
    model = small()
    model[2].register_buffer("mask", torch.ones(3), persistent=False)
    record = dataclasses.replace(svdtune.read_delta(delta), buffers={"2.mask": torch.zeros(3)})
    with pytest.raises(svdtune.SvdtuneError, match="'2.mask'.*non-persistent"):
        svdtune.load_delta(model, record)
    assert torch.equal(model[2].mask, torch.ones(3)) and type(model[0]) is nn.Linear
