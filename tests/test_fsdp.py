"""FSDP2 (fully_shard): 2 CPU processes (gloo) train sharded deltas against an unsharded reference.

Each rank trains on its half of every batch; FSDP2 averages the gradients, so the deltas must follow
the unsharded model trained on the whole batch. The factors are sharded (each rank holds its share),
no SVD runs after apply, save_delta writes the file an unsharded model with the same deltas writes,
and that file merges into a plain model as the dense formula W + U diag(shift) Vh says; rank 0 alone
can print the model and its report (no collective).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import svdtune
from svdtune.errors import SvdtuneError

WORLD, STEPS, BATCH = 2, 4, 6
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.up, self.down = nn.Linear(12, 20), nn.Linear(20, 12)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.down(torch.tanh(self.up(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 12), Block(), Block(), nn.Linear(12, 3))


def _adapt(model: nn.Module) -> nn.Module:
    return svdtune.apply(model, targets=["0", "*.attn", "*.up", "*.down", "3"], rank=None)


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 30, (BATCH, 5), generator=generator) for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    optimizer = torch.optim.SGD(svdtune.trainable_parameters(model), lr=0.5)
    losses = []
    for tokens in batches:
        loss = model(tokens).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        model = _adapt(_model())
        svd_calls = []
        original = svdtune.layers.SpectralLayer.redecompose
        svdtune.layers.SpectralLayer.redecompose = lambda self: (svd_calls.append(1), original(self))[1]
        for block in (model[1], model[2], model[3]):  # blocks, and the head layer itself
            fully_shard(block)
        fully_shard(model)
        shards = {name: (tuple(p.to_local().shape), tuple(p.shape)) for name, p in model.named_parameters()
                  if ".svd_U" in name or ".svd_Vh" in name}
        half = [tokens[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for tokens in _batches()]
        _train(model, half)
        deltas = {name: p.full_tensor() for name, p in model.named_parameters() if ".svd_delta" in name}
        svdtune.save_delta(model, os.path.join(out_dir, "sharded.safetensors"))
        refusals = []
        for action in (svdtune.merge, svdtune.restore, lambda m: svdtune.load_delta(m, os.path.join(
                out_dir, "sharded.safetensors")), lambda m: svdtune.apply(m, targets=["1.attn.out_proj"]),
                lambda m: svdtune.set_memory(m, offload_base=True)):
            try:
                action(model)
            except SvdtuneError as error:
                refusals.append(str(error))
        # rank 0 alone, as logging code does: describing the model must not be a collective (nothing would answer)
        described = repr(model) + str(svdtune.report(model)) if rank == 0 else ""
        torch.save({"deltas": deltas, "shards": shards, "svd_calls": len(svd_calls), "refusals": refusals,
                    "described": described}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return out, ranks


@pytest.mark.slow
def test_each_rank_holds_its_share_of_the_factors_and_no_svd_runs_again(run):
    _, ranks = run
    for state in ranks:
        assert state["svd_calls"] == 0
        assert len(state["shards"]) == 2 * (6 + 2 * 3)  # U and Vh of 6 layers and 2 x 3 attention parts
        for local, whole in state["shards"].values():
            assert local[0] == -(-whole[0] // WORLD) or local[0] == whole[0] - -(-whole[0] // WORLD)
            assert local[1:] == whole[1:]


@pytest.mark.slow
def test_sharded_deltas_are_identical_across_ranks_and_follow_the_unsharded_model(run):
    _, ranks = run
    reference = _adapt(_model())
    _train(reference, _batches())
    expected = {name: p.detach() for name, p in reference.named_parameters() if ".svd_delta" in name}
    assert ranks[0]["deltas"].keys() == expected.keys() and len(expected) == 6 + 2 * 3
    for name, delta in expected.items():
        assert torch.equal(ranks[0]["deltas"][name], ranks[1]["deltas"][name]), name
        assert delta.abs().sum() > 0, name  # it trained
        torch.testing.assert_close(ranks[0]["deltas"][name], delta, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_save_delta_from_the_sharded_model_writes_the_unsharded_models_file(run, tmp_path):
    out, ranks = run
    plain = _adapt(_model())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if ".svd_delta" in name:
                p.copy_(ranks[0]["deltas"][name])
    svdtune.save_delta(plain, tmp_path / "plain.safetensors")
    assert (out / "sharded.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


@pytest.mark.slow
def test_the_gathered_delta_merges_into_a_plain_model_as_the_dense_formula_says(run):
    out, ranks = run
    base = _model()
    merged = svdtune.merge(svdtune.load_delta(copy.deepcopy(base), out / "sharded.safetensors"))
    deltas, checked = ranks[0]["deltas"], 0
    for name, module in base.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # q, k, v: the thirds of in_proj_weight, each its own SVD
            matrices = module.in_proj_weight.detach().double().chunk(3)
            parts = [(W, deltas[f"{name}.svd_delta_{part}"]) for W, part in zip(matrices, ("q_proj", "k_proj", "v_proj"))]
            actual = merged.get_submodule(name).in_proj_weight.double().chunk(3)
        elif isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("out_proj"):
            parts = [(module.weight.detach().double(), deltas[f"{name}.svd_delta"])]
            actual = [merged.get_submodule(name).weight.double()]
        else:
            continue
        for (W, delta), merged_weight in zip(parts, actual):
            U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
            expected = W + U @ torch.diag(torch.clamp(delta.double(), min=-sigma)) @ Vh
            torch.testing.assert_close(merged_weight, expected, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == len(deltas)


@pytest.mark.slow
def test_rank_zero_alone_prints_the_model_and_its_report(run):
    described = run[1][0]["described"]
    assert "SpectralMultiheadAttention" in described and "q_proj=12/12" in described
    assert "1.attn.q_proj  MultiheadAttention  12x12" in described


@pytest.mark.slow
def test_merge_restore_load_apply_and_offload_refuse_a_sharded_model_with_what_to_do(run):
    _, ranks = run
    for state in ranks:
        merge, restore, load, apply, offload = state["refusals"]
        assert "sharded by FSDP2" in offload and "CPUOffloadPolicy" in offload
        assert "sharded by FSDP2" in merge and "save_delta" in merge
        assert "sharded by FSDP2" in restore and "sharded by FSDP2" in load and "before fully_shard" in load
        assert "sharded by FSDP2" in apply and "before fully_shard" in apply
