"""One table of checks over every model of the zoo (zoo_models.ENTRIES): each check is one function,
each model one entry; pytest runs every (check, model) pair. Models come from tiny configs with random
weights; the transformers/diffusers entries are skipped when the ``zoo`` extra is not installed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdtune
from svdtune.layers import SpectralLayer
from zoo_models import ENTRIES, ZooEntry

pytestmark = pytest.mark.zoo


def adapted(entry: ZooEntry, seed: int = 0) -> nn.Module:
    model = entry.build(seed)
    svdtune.apply(model, entry.targets, exclude=entry.exclude, trainable=entry.trainable)
    return model


def train(entry: ZooEntry, model: nn.Module, steps: int = 1) -> list[float]:
    """A few AdamW steps towards a fixed random target; the losses before each step and after the last."""
    batch = entry.batch(model)
    with torch.no_grad():
        target = torch.randn(entry.forward(model, batch).shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(entry.forward(model, batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(nn.functional.mse_loss(entry.forward(model, batch), target).item())
    return losses


def output(entry: ZooEntry, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return entry.forward(model, entry.batch(model))


def check_exact_init(entry: ZooEntry, tmp_path) -> None:
    model = entry.build(0)
    before = output(entry, model)
    svdtune.apply(model, entry.targets, exclude=entry.exclude, trainable=entry.trainable)
    assert torch.equal(output(entry, model), before)


def check_gradients_reach_every_delta(entry: ZooEntry, tmp_path) -> None:
    model = adapted(entry)
    entry.forward(model, entry.batch(model)).square().sum().backward()
    deltas = {name: p for name, p in model.named_parameters() if name.rpartition(".")[2].startswith("svd_delta")}
    assert deltas
    for name, delta in deltas.items():
        assert delta.grad is not None and bool(delta.grad.abs().sum() > 0), name
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
    assert not frozen


def check_adamw_lowers_the_loss(entry: ZooEntry, tmp_path) -> None:
    losses = train(entry, adapted(entry), steps=3)
    assert losses[-1] < losses[0], losses


def check_save_load_into_fresh_copy_is_exact(entry: ZooEntry, tmp_path) -> None:
    model = adapted(entry)
    train(entry, model)
    svdtune.save_delta(model, tmp_path / "delta.safetensors")
    fresh = svdtune.load_delta(entry.build(0), tmp_path / "delta.safetensors")
    assert torch.equal(output(entry, fresh), output(entry, model))
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def check_other_base_is_refused(entry: ZooEntry, tmp_path) -> None:
    model = adapted(entry)
    train(entry, model)
    svdtune.save_delta(model, tmp_path / "delta.safetensors")
    other = entry.build(1)
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(svdtune.SvdtuneError, match="fingerprint|base weight"):
        svdtune.load_delta(other, tmp_path / "delta.safetensors")
    assert not any(isinstance(m, SpectralLayer) for m in other.modules())
    assert other.state_dict().keys() == state.keys()
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def check_merge_gives_plain_modules(entry: ZooEntry, tmp_path) -> None:
    model = adapted(entry)
    train(entry, model)
    expected = output(entry, model)
    merged = svdtune.merge(copy.deepcopy(model))
    assert not any(isinstance(m, SpectralLayer) for m in merged.modules())
    plain = entry.build(0)
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    plain.load_state_dict(merged.state_dict())  # strict: exactly the plain model's keys
    torch.testing.assert_close(output(entry, plain), expected, rtol=1e-4, atol=1e-5)


def check_restore_is_bit_exact(entry: ZooEntry, tmp_path) -> None:
    model = entry.build(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    classes = [type(m) for m in model.modules()]
    svdtune.apply(model, entry.targets, exclude=entry.exclude, trainable=entry.trainable)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("svd_delta")}
    train(entry, model)
    svdtune.restore(model)
    assert [type(m) for m in model.modules()] == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        if key not in trained:  # a trainable module keeps what it learnt
            assert torch.equal(value, before[key]), key


def check_export_lora_round_trips(entry: ZooEntry, tmp_path) -> None:
    """PEFT loads the exact LoRA export of random deltas and reproduces the adapted model's outputs, where
    svdtune can express the model's layers in PEFT's format (else export_lora refuses by name: skipped)."""
    peft = pytest.importorskip("peft")
    model = entry.build(0)
    svdtune.apply(model, entry.targets, exclude=entry.exclude)  # deltas only: a LoRA holds no fully trained head
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2].startswith("svd_delta"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    try:
        svdtune.export_lora(model, tmp_path / "lora")
    except svdtune.SvdtuneError as error:
        pytest.skip(f"export_lora refuses a layer of this model by name: {error}")
    base = entry.build(0)
    batch = entry.batch(base)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(entry.forward(loaded, batch), entry.forward(model, batch), rtol=1e-4, atol=1e-4)


CHECKS = [check_exact_init, check_gradients_reach_every_delta, check_adamw_lowers_the_loss,
          check_save_load_into_fresh_copy_is_exact, check_other_base_is_refused, check_merge_gives_plain_modules,
          check_restore_is_bit_exact, check_export_lora_round_trips]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_zoo(check, entry: ZooEntry, tmp_path) -> None:
    for package in entry.requires:
        pytest.importorskip(package)
    check(entry, tmp_path)
