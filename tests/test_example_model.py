"""CNNIQA of the example: architecture, checkpoint loading, and the variants' starting points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtune
from examples.cnniqa_agiqa.cli import parse_config
from examples.cnniqa_agiqa.config import DEFAULTS
from examples.cnniqa_agiqa.model import CNNIQA, EXPECTED_SHAPES, load_pretrained, save_plain
from examples.cnniqa_agiqa.variants import VARIANTS, build, parse_variants

KEYS = ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.1 for k, shape in EXPECTED_SHAPES.items()}


def _reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CNNIQA written out with functional ops: conv, global max and min pool, three linears."""
    h = F.conv2d(x, state["conv1.weight"], state["conv1.bias"])
    pooled_max = F.max_pool2d(h, kernel_size=h.shape[-2:]).flatten(1)
    pooled_min = -F.max_pool2d(-h, kernel_size=h.shape[-2:]).flatten(1)
    h = F.relu(F.linear(torch.cat([pooled_max, pooled_min], 1), state["fc1.weight"], state["fc1.bias"]))
    h = F.relu(F.linear(h, state["fc2.weight"], state["fc2.bias"]))
    return F.linear(h, state["fc3.weight"], state["fc3.bias"]).squeeze(1)


def test_state_dict_keys_and_shapes_are_iqa_pytorch_s():
    model = CNNIQA()
    assert list(model.state_dict()) == KEYS
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == EXPECTED_SHAPES
    assert model.conv1.padding == (0, 0) and model.dropout.p == 0.5


def test_forward_equals_functional_reference():
    state = _random_state(0)
    model = CNNIQA()
    model.load_state_dict(state)
    model.eval()
    x = torch.rand(3, 3, 37, 29)
    torch.testing.assert_close(model(x), _reference(state, x))
    assert model(torch.rand(2, 3, 7, 7)).shape == (2,)


def test_dropout_only_in_training():
    model = CNNIQA()
    x = torch.rand(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("layout", ["iqa-pytorch", "bare", "safetensors"])
def test_pretrained_layouts_load(tmp_path, layout):
    state = _random_state(1)
    source = CNNIQA()
    source.load_state_dict(state)
    if layout == "iqa-pytorch":
        path = tmp_path / "CNNIQA_koniq10k-e6f14c91.pth"
        torch.save({"params": state}, path)
    elif layout == "bare":
        path = tmp_path / "bare.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "w.safetensors"
        save_plain(source, path)
    loaded = load_pretrained(CNNIQA(), path)
    for key in KEYS:
        assert torch.equal(loaded.state_dict()[key], state[key]), key


def test_wrong_keys_and_shapes_are_named(tmp_path):
    state = _random_state(2)
    state["head.weight"] = state.pop("fc3.weight")
    state["fc2.bias"] = torch.zeros(799)
    path = tmp_path / "bad.pth"
    torch.save({"params": state}, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(CNNIQA(), path)
    message = str(info.value)
    assert "missing keys ['fc3.weight']" in message
    assert "unexpected keys ['head.weight']" in message
    assert "fc2.bias: file (799,) vs model (800,)" in message


def test_unreadable_and_absent_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="CNNIQA_koniq10k"):
        load_pretrained(CNNIQA(), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read"):
        load_pretrained(CNNIQA(), tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(CNNIQA(), tmp_path / "list.pth")


def test_save_plain_refuses_adapted_model(tmp_path):
    model = svdtune.apply(CNNIQA(), targets=["fc3"])
    with pytest.raises(ValueError, match="svdtune.merge"):
        save_plain(model, tmp_path / "x.safetensors")


def test_corrupt_safetensors_checkpoint_is_a_clear_error(tmp_path):
    source = CNNIQA()
    save_plain(source, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    for name in ("cut.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match=r"could not read pretrained weights .*" + name + ".*IQA-PyTorch"):
            load_pretrained(CNNIQA(), tmp_path / name)


def test_safetensors_written_by_the_safetensors_library_still_load(tmp_path):
    from safetensors.torch import save_file

    state = _random_state(4)
    save_file(state, str(tmp_path / "w.safetensors"))  # no svdtune checksum in the header
    loaded = load_pretrained(CNNIQA(), tmp_path / "w.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in KEYS)


def test_save_plain_is_atomic(tmp_path, monkeypatch):
    """A save that fails before the rename leaves the old file intact and no temporary file behind."""
    path = tmp_path / "merged.safetensors"
    save_plain(CNNIQA(), path, metadata={"note": "old"})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_plain(CNNIQA(), path, metadata={"note": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:  # still a plain safetensors file
        assert handle.metadata()["note"] == "old" and sorted(handle.keys()) == sorted(KEYS)


def _config():
    return parse_config(["--quiet"])


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "scratch"])
def test_every_pretrained_variant_starts_at_the_pretrained_model(name):
    state = _random_state(3)
    reference = CNNIQA()
    reference.load_state_dict(state)
    reference.eval()
    model, params, lr = build(VARIANTS[name], state, _config(), seed=99)
    model.eval()
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    for key in KEYS:  # every layer, fc3 and the biases included, holds the pretrained values
        assert torch.equal(model.state_dict()[key], state[key]), key
    expected = {"zero-shot": 0, "full": 729_801, "head": 801, "svd-fc": 100 + 800 + 1,
                "svd-conv": 50, "svd-all": 951}[name]
    assert sum(p.numel() for p in params) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert (lr > 0) == (expected > 0)


def test_scratch_ignores_pretrained_and_needs_none():
    model, params, lr = build(VARIANTS["scratch"], None, _config(), seed=5)
    assert len(params) == 8 and lr == DEFAULTS["synthetic"]["lr_scratch"]
    with pytest.raises(ValueError, match="needs --pretrained"):
        build(VARIANTS["svd-fc"], None, _config(), seed=5)


def test_parse_variants():
    assert parse_variants("all") == tuple(VARIANTS)
    assert parse_variants("svd-fc, zero-shot") == ("zero-shot", "svd-fc")
    with pytest.raises(ValueError, match="unknown variants \\['svd'\\]; choose from"):
        parse_variants("svd")


def test_svd_layers_keep_their_class():
    model, _, _ = build(VARIANTS["svd-all"], _random_state(4), _config(), seed=0)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc3, nn.Linear)
    assert sorted(k for k in model.state_dict() if k.endswith("svd_delta")) == [
        "conv1.svd_delta", "fc1.svd_delta", "fc2.svd_delta", "fc3.svd_delta"]


def _pyiqa_load(path) -> dict[str, torch.Tensor]:
    """What IQA-PyTorch's CNNIQA(pretrained_model_path=path) does with a file: load_pretrained_network(net, path,
    strict=True, weight_keys='params'), i.e. take the "params" entry and drop a leading 'module.' from each key."""
    state = torch.load(path, map_location="cpu", weights_only=True)["params"]
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def test_save_pyiqa_writes_the_layout_iqa_pytorch_loads(tmp_path):
    from examples.cnniqa_agiqa.model import save_pyiqa

    state = _random_state(4)
    model = CNNIQA()
    model.load_state_dict(state)
    path = tmp_path / "merged.pth"
    save_pyiqa(model, path)
    payload = torch.load(path, weights_only=True)  # only tensors: the safe loader reads it
    assert list(payload) == ["params"] and list(payload["params"]) == KEYS
    strict = CNNIQA()
    strict.load_state_dict(_pyiqa_load(path), strict=True)  # IQA-PyTorch loads with strict key matching
    x = torch.rand(2, 3, 20, 24)
    torch.testing.assert_close(strict.eval()(x), _reference(state, x))
    for key in KEYS:
        assert torch.equal(load_pretrained(CNNIQA(), path).state_dict()[key], state[key])
    with pytest.raises(ValueError, match="svdtune.merge"):
        save_pyiqa(svdtune.apply(CNNIQA(), targets=["fc3"]), tmp_path / "adapted.pth")


def test_dataparallel_prefix_loads_with_a_note(tmp_path, capsys):
    state = _random_state(5)
    wrapped = nn.DataParallel(CNNIQA())  # saves keys as module.conv1.weight, ...
    wrapped.module.load_state_dict(state)
    path = tmp_path / "dp.pth"
    torch.save({"params": wrapped.state_dict()}, path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["params"])
    loaded = load_pretrained(CNNIQA(), path)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in KEYS)
    assert all(torch.equal(_pyiqa_load(path)[k], state[k]) for k in KEYS)  # the same keys IQA-PyTorch reads
    note = capsys.readouterr().err
    assert note.startswith(f"note: {path}: 8 of 8 keys start with 'module.'") and "DataParallel" in note


def test_pyiqa_reads_the_merged_pth_when_installed(tmp_path):
    """With IQA-PyTorch installed, its own CNNIQA loads the .pth and scores exactly as the example's model."""
    pyiqa_arch = pytest.importorskip("pyiqa.archs.cnniqa_arch")
    from examples.cnniqa_agiqa.model import save_pyiqa

    model = CNNIQA()
    model.load_state_dict(_random_state(6))
    save_pyiqa(model, tmp_path / "m.pth")
    theirs = pyiqa_arch.CNNIQA(pretrained=None, pretrained_model_path=str(tmp_path / "m.pth")).eval()
    x = torch.rand(2, 3, 30, 30)
    torch.testing.assert_close(theirs(x).squeeze(1), model.eval()(x))


def test_multistep_schedule_equals_torch_multisteplr_stepped_per_epoch():
    """--schedule multistep is IQA-PyTorch's MultiStepLR(milestones 10/20/30/40, gamma 0.5), stepped each epoch."""
    from examples.cnniqa_agiqa.train import lr_lambda

    epochs, per_epoch = 50, 3
    ours_param, theirs_param = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    ours = torch.optim.AdamW([ours_param], lr=1e-3)
    theirs = torch.optim.AdamW([theirs_param], lr=1e-3)
    ours_schedule = torch.optim.lr_scheduler.LambdaLR(ours, lr_lambda("multistep", epochs * per_epoch, per_epoch))
    theirs_schedule = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[10, 20, 30, 40], gamma=0.5)
    for _ in range(epochs):
        for _ in range(per_epoch):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
            ours.step()
            ours_schedule.step()
        theirs.step()
        theirs_schedule.step()
    assert theirs.param_groups[0]["lr"] == pytest.approx(1e-3 / 16)


def test_recipe_pyiqa_sets_iqa_pytorch_s_options_and_explicit_ones_win():
    config = parse_config(["--data-root", "AGIQA-3K", "--recipe", "pyiqa"])
    assert (config.epochs, config.batch_size, config.crop, config.resize, config.eval_crop) == (50, 64, 384, 384, 0)
    assert config.hflip and config.schedule == "multistep" and config.weight_decay == 0.01
    assert config.lr_scratch == config.lr_full == config.lr_head == 1e-3
    assert config.lr_svd == DEFAULTS["agiqa"]["lr_svd"]  # not part of the recipe
    mine = parse_config(["--data-root", "A", "--recipe", "pyiqa", "--epochs", "3", "--crop", "224", "--lr-full", "1e-4"])
    assert (mine.epochs, mine.crop, mine.lr_full, mine.batch_size) == (3, 224, 1e-4, 64)
    default = parse_config(["--data-root", "A"])
    assert (default.hflip, default.schedule, default.resize, default.cache_mb) == (False, "cosine", 0, 4096)
    assert parse_config(["--quick", "--hflip"]).hflip
    with pytest.raises(ValueError, match="--recipe pyiqa .* use it with --data-root"):
        parse_config(["--quick", "--recipe", "pyiqa"])
    with pytest.raises(ValueError, match="--cache-mb"):
        parse_config(["--data-root", "A", "--cache-mb", "-1"])


def test_svd_mode_reaches_svdtune():
    for mode, expected in (("shift", lambda s: s + 0.5), ("scale", lambda s: s * 1.5)):
        model, params, _ = build(VARIANTS["svd-fc"], CNNIQA().state_dict(), parse_config(["--quick", "--svd-mode", mode]), 0)
        with torch.no_grad():
            for p in params:
                p.fill_(0.5)
        for name, (sigma, adapted) in svdtune.singular_values(model).items():
            torch.testing.assert_close(adapted, expected(sigma)), (mode, name)
