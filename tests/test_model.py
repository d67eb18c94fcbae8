"""Model-level behaviour: selecting layers, errors that leave the model alone, freezing, report."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import svdtune
from svdtune import SvdtuneError
from svdtune.layers import SpectralLayer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4, 8)
        self.head = nn.Sequential()
        self.head.fc2 = nn.Linear(8, 8)
        self.head.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x).amax(dim=(2, 3))
        return self.out(self.head.norm(self.head.fc2(torch.relu(self.fc1(h)))))


def snapshot(model: nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    modules, state, flags = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    for key in state:  # bit for bit, NaN included
        torch.testing.assert_close(state[key], before[1][key], rtol=0, atol=0, equal_nan=True)
    assert flags == before[2]


def adapted_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, SpectralLayer)]


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["fc*"], ["fc1", "head.fc2"]),
        ("fc*", ["fc1", "head.fc2"]),
        (["head.fc2"], ["head.fc2"]),
        (["fc2"], ["head.fc2"]),
        (["head.*"], ["head.fc2"]),
        (["*"], ["conv", "fc1", "head.fc2", "out"]),
        (["conv", "out"], ["conv", "out"]),
    ],
)
def test_target_patterns(targets, expected):
    model = svdtune.apply(Net(), targets=targets)
    assert adapted_names(model) == expected


def test_exclude_uses_the_same_rule():
    model = svdtune.apply(Net(), targets=["*"], exclude=["fc2", "conv"])
    assert adapted_names(model) == ["fc1", "out"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(targets=["fcc1"]), "'fcc1' selects no module. Similar layer names: fc1"),
        (dict(targets=["fc*"], exclude=["fc3"]), "'fc3'"),
        (dict(targets=["head"]), "head.*"),
        (dict(targets=["norm"]), "of a kind svdtune does not adapt and with no such layers inside"),
        (dict(targets=["fc1"], mode="rotate"), "mode='rotate'"),
        (dict(targets=["fc1"], rank=0), "rank=0"),
        (dict(targets=["fc1"], trainable=["fc1"]), "both a target and inside trainable"),
        (dict(targets=[""]), "non-empty"),
        (dict(targets=None), "targets must be a glob pattern or a list"),
        (dict(targets="fc1", exclude=3), "exclude must be a glob pattern"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_alone(kwargs, needle):
    model = Net()
    before = snapshot(model)
    with pytest.raises(SvdtuneError, match=None) as info:
        svdtune.apply(model, **kwargs)
    assert needle in str(info.value)
    assert_unchanged(model, before)


def test_applying_twice_to_a_layer_is_refused_and_changes_nothing():
    model = svdtune.apply(Net(), targets=["fc1"])
    before = snapshot(model)
    with pytest.raises(SvdtuneError, match="'fc1' is already adapted"):
        svdtune.apply(model, targets=["fc*"])
    assert_unchanged(model, before)


def test_second_apply_on_other_layers_keeps_first_deltas_trainable():
    model = svdtune.apply(Net(), targets=["fc1"], trainable=["norm"])
    svdtune.apply(model, targets=["out"], mode="scale", rank=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"fc1.svd_delta", "out.svd_delta", "head.norm.weight", "head.norm.bias"}
    assert model.out.spectral_config.mode == "scale" and model.out.svd_delta.numel() == 1


def test_non_finite_weight_is_refused_before_any_change():
    model = Net()
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(SvdtuneError, match="'out'.*NaN"):
        svdtune.apply(model, targets=["fc1", "out"])
    assert_unchanged(model, before)


def test_lazy_and_parametrized_layers_are_refused():
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(SvdtuneError, match="lazy"):
        svdtune.apply(lazy, targets=["0"])
    param = nn.Sequential(nn.Linear(3, 3))
    torch.nn.utils.parametrizations.orthogonal(param[0])
    with pytest.raises(SvdtuneError, match="parametriz"):
        svdtune.apply(param, targets=["0"])


def test_single_layer_model_gets_a_hint():
    with pytest.raises(SvdtuneError, match="single layer"):
        svdtune.apply(nn.Linear(3, 3), targets=["*"])


def test_everything_but_deltas_and_trainable_is_frozen_and_restore_gives_flags_back():
    model = Net()
    model.conv.requires_grad_(False)  # the user had frozen this before
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    svdtune.apply(model, targets=["fc*"], trainable=["out"])
    params = svdtune.trainable_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in params] == ["fc1.svd_delta", "head.fc2.svd_delta", "out.weight", "out.bias"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {names[id(p)] for p in params}
    svdtune.restore(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_state_dict_keeps_base_keys_and_adds_one_delta_per_layer():
    model = Net()
    keys = set(model.state_dict())
    svdtune.apply(model, targets=["fc*"], rank=3)
    assert set(model.state_dict()) == keys | {"fc1.svd_delta", "head.fc2.svd_delta"}
    assert model.fc1.svd_delta.shape == (3,) and not list(model.fc1.buffers())
    fresh = Net()
    svdtune.apply(fresh, targets=["fc*"], rank=3)
    fresh.load_state_dict(model.state_dict())  # an adapted checkpoint round-trips


def test_report_lists_layers_and_totals():
    model = svdtune.apply(Net(), targets=["fc*", "conv"], rank=5, trainable=["out"])
    report = svdtune.report(model)
    table = str(report)
    assert [r.name for r in report.rows] == ["conv", "fc1", "head.fc2", "out.weight", "out.bias"]
    conv = report.rows[0]
    assert (conv.type, conv.weight_shape, conv.rank, conv.trainable) == ("Conv2d", (4, 3, 3, 3), "4/4", 4)
    assert report.rows[1].rank == "4/4" and report.rows[2].rank == "5/8"
    total = sum(p.numel() for p in Net().parameters())  # the model's own parameters: no deltas, no factors
    assert report.total == total and report.trainable == 4 + 4 + 5 + 16 + 2
    assert "layer" in table and "head.fc2" in table and f"{100 * report.trainable / total:.4f}%" in table


def test_functions_need_an_adapted_model():
    for fn in (svdtune.merge, svdtune.restore, svdtune.trainable_parameters, svdtune.singular_values):
        with pytest.raises(SvdtuneError, match="svdtune.apply"):
            fn(Net())
    with pytest.raises(SvdtuneError, match="scale"):
        svdtune.set_scale(svdtune.apply(Net(), targets="fc1"), float("inf"))


def test_merge_checks_every_layer_before_changing_any():
    model = svdtune.apply(Net(), targets=["fc1", "out"])
    with torch.no_grad():
        model.out.svd_delta.fill_(float("inf"))
    before = snapshot(model)
    with pytest.raises(SvdtuneError, match="'out'.*non-finite"):
        svdtune.merge(model)
    assert_unchanged(model, before)


def test_deepcopy_of_adapted_model_is_independent():
    model = svdtune.apply(Net(), targets=["fc1"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.fc1.svd_delta.fill_(0.5)
    assert torch.count_nonzero(model.fc1.svd_delta) == 0
    x = torch.randn(2, 3, 6, 6)
    assert not torch.allclose(model(x), twin(x))


def test_whole_adapted_model_pickles_with_torch_save(tmp_path):
    model = svdtune.apply(Net(), targets=["fc*", "conv"], rank=2)
    with torch.no_grad():
        model.fc1.svd_delta.fill_(0.25)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert adapted_names(loaded) == ["conv", "fc1", "head.fc2"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    svdtune.restore(loaded)
    assert type(loaded.fc1) is nn.Linear


@pytest.mark.parametrize("kwargs", [dict(targets=[]), dict(targets="*", exclude="*")])
def test_a_selection_that_leaves_nothing_is_refused(kwargs):
    model = Net()
    before = snapshot(model)
    with pytest.raises(SvdtuneError, match="leaves no layer"):
        svdtune.apply(model, **kwargs)
    assert_unchanged(model, before)


def test_shared_layers_and_tied_weights_are_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    for targets in ("0", "2", "*"):
        with pytest.raises(SvdtuneError, match="is shared: the same module is also"):
            svdtune.apply(model, targets=targets)
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    tied = nn.ModuleDict({"emb": embedding, "head": head})
    before = snapshot(tied)
    with pytest.raises(SvdtuneError, match="'head' has its weight tied to 'emb.weight'"):
        svdtune.apply(tied, targets="head")
    assert_unchanged(tied, before)


def test_meta_device_weights_are_refused_with_the_fix():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(SvdtuneError, match="'fc1' is on the meta device.*load_state_dict"):
        svdtune.apply(model, targets="fc1")


@pytest.mark.parametrize("finish", [svdtune.merge, svdtune.restore])
def test_flags_come_back_when_apply_got_a_submodule(finish):
    model = Net()
    svdtune.apply(model.head, targets="fc2")
    assert not model.head.norm.weight.requires_grad
    finish(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("_svdtune_requires_grad" in m.__dict__ for m in model.modules())


def test_copies_and_pickles_need_no_new_svd(monkeypatch):
    import pickle

    model = svdtune.apply(Net(), targets=["fc*"])
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    x = torch.randn(2, 3, 6, 6)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(twin(x), model(x))
    assert calls == []


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5), torch.tensor([0.5])],
                         ids=["np.float32", "np.float64", "np.int64", "0-d tensor", "1-element tensor"])
def test_set_scale_takes_numpy_and_tensor_scalars_as_python_floats(scale):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 3)), targets=["0"])
    svdtune.set_scale(model, scale)
    stored = model[0]._spectral.config.scale
    assert type(stored) is float and stored == float(scale)


@pytest.mark.parametrize("scale", [np.bool_(True), torch.tensor(True), torch.tensor([0.5, 1.0]), np.float32("nan"), torch.tensor(float("inf"))],
                         ids=["np.bool_", "bool tensor", "2-element tensor", "nan", "inf tensor"])
def test_set_scale_refuses_other_scalars_and_keeps_the_old_scale(scale):
    model = svdtune.apply(nn.Sequential(nn.Linear(4, 3)), targets=["0"])
    with pytest.raises(svdtune.SvdtuneError, match="must be a finite number"):
        svdtune.set_scale(model, scale)
    assert model[0]._spectral.config.scale == 1.0
