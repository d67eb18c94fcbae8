"""The Hugging Face workflow on a tiny Llama (random weights, no downloads): transformers.Trainer trains
an adapted model and resumes from its checkpoints (full or delta-only), the merged model round-trips through
save_pretrained/from_pretrained, and save_pretrained of the unmerged model warns."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import svdtune

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from svdtune.integrations.transformers import DELTA_FILE, SvdtuneCallback, save_merged  # noqa: E402

pytestmark = pytest.mark.zoo
TARGETS = ["q_proj", "v_proj"]
GUARD = "save_pretrained of a model with svdtune layers"


def base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).eval()


def data() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def mean_loss(model) -> float:
    batch = torch.stack([d["input_ids"] for d in data()])
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def trainer(model, output_dir, callback: SvdtuneCallback) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
        save_strategy="steps", save_steps=3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data(), callbacks=[callback])


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("svd_delta")}


@pytest.mark.parametrize("keep_base_weights", [True, False], ids=["full-checkpoints", "delta-only-checkpoints"])
def test_trainer_trains_saves_the_delta_and_resumes(tmp_path, recwarn, keep_base_weights):
    model = svdtune.apply(base(), TARGETS)
    before = mean_loss(model)
    trainer(model, tmp_path, SvdtuneCallback(keep_base_weights)).train()
    assert mean_loss(model) < before
    assert not [w for w in recwarn if GUARD in str(w.message)]  # checkpoints are not the pitfall
    checkpoint = tmp_path / "checkpoint-3"
    # the delta of step 3 reproduces the checkpoint's own weights file
    saved = svdtune.read_delta(checkpoint / DELTA_FILE)
    assert saved.metadata["global_step"] == "3"
    from safetensors.torch import load_file
    weights = load_file(checkpoint / "model.safetensors")
    for name, layer in saved.layers.items():
        assert torch.equal(weights[f"{name}.svd_delta"], layer.delta)
    if not keep_base_weights:
        assert sorted(weights) == sorted(f"{name}.svd_delta" for name in saved.layers)  # no base weight left
        assert os.path.getsize(checkpoint / "model.safetensors") < 4096

    resumed = svdtune.apply(base(), TARGETS)  # the same base, adapted the same way
    trainer(resumed, tmp_path, SvdtuneCallback(keep_base_weights)).train(resume_from_checkpoint=str(checkpoint))
    for name, delta in deltas(model).items():
        torch.testing.assert_close(deltas(resumed)[name], delta, rtol=1e-5, atol=1e-7)


def trained(seed: int = 0):
    model = svdtune.apply(base(seed), TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("svd_delta"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.stack([d["input_ids"] for d in data()[:2]])).logits


def test_merged_model_round_trips_through_save_pretrained(tmp_path):
    merged = svdtune.merge(trained())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        merged.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(merged))


def test_save_merged_leaves_the_model_adapted_and_loads_into_the_plain_class(tmp_path):
    model = trained()
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        save_merged(model, tmp_path)
    assert any(isinstance(m, svdtune.layers.SpectralLayer) for m in model.modules())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    reference = svdtune.merge(copy.deepcopy(model)).state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-5)


def test_save_pretrained_of_the_unmerged_model_warns_and_the_warning_is_right(tmp_path):
    model = trained()
    with pytest.warns(UserWarning, match=GUARD):
        model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(plain), logits(base()))  # the deltas were dropped: the base model came back
    assert not torch.allclose(logits(plain), logits(model))
    assert os.path.exists(tmp_path / "model.safetensors")


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "fsdp2"])
def test_callback_saves_on_every_process_of_a_sharded_model_only(tmp_path, monkeypatch, sharded):
    """save_delta gathers a sharded model on every rank (a collective): the callback must call it on the
    processes that do not save, too; for a plain model only the saving process writes."""
    import types

    import svdtune.integrations.transformers as hf

    calls = []
    monkeypatch.setattr(hf, "sharded_tensors", lambda model: ["0.svd_U"] if sharded else [])
    monkeypatch.setattr(hf, "save_delta", lambda model, path, metadata: calls.append(path))
    model = svdtune.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"])
    args = types.SimpleNamespace(should_save=False, output_dir=str(tmp_path))  # a rank other than 0
    state = types.SimpleNamespace(global_step=3)
    SvdtuneCallback().on_save(args, state, None, model=model)
    assert len(calls) == (1 if sharded else 0)
    if sharded:
        with pytest.raises(svdtune.SvdtuneError, match="keep_base_weights=True"):
            SvdtuneCallback(keep_base_weights=False).on_save(args, state, None, model=model)
