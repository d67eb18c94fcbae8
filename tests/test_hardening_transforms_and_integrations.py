"""Hardening found by a third adversarial review (issue 10): torch.func transforms, save_merged, argument types.

Each test fails on main at 8bbb99c and states the promise of docs/guide.md, docs/api.md or
docs/deploy.md it checks, against a dense float64 reference where outputs are concerned.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy
import pytest
import torch
from torch import nn

import svdtune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(script: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# 2. save_merged / merged_state_dict (svdtune.integrations.transformers): "the folder loads into the plain
# class: type(model).from_pretrained(save_directory) gives the adapted model's outputs". apply adapts
# nn.MultiheadAttention (api.md), which transformers models use (Mask2Former, OneFormer, custom heads), but
# merged_state_dict deletes "<layer>.svd_delta", a key an attention layer does not have
# (svd_delta_q_proj...): KeyError, a traceback instead of a merged folder or an SvdtuneError.
def test_save_merged_of_a_model_with_an_adapted_multihead_attention(tmp_path):
    transformers = pytest.importorskip("transformers")
    from svdtune.integrations.transformers import save_merged

    class TinyConfig(transformers.PretrainedConfig):
        model_type = "svdtune-review3-mha"

    class Tiny(transformers.PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)
            self.post_init()

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Tiny(TinyConfig()).eval()
    svdtune.apply(model, ["attn", "head"])
    torch.manual_seed(1)
    with torch.no_grad():
        for delta in svdtune.trainable_parameters(model):
            delta.copy_(torch.randn_like(delta) * 0.3)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        expected = model(x)
    save_merged(model, tmp_path)
    loaded = Tiny.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, svdtune.layers.SpectralLayer) for m in loaded.modules())
    reference = svdtune.merge(copy.deepcopy(model)).state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)


# 3. docs/guide.md (Devices): "The probe does not run inside torch.func transforms"; svdtune supports
# torch.func grad, vmap and jvp (guide, kernels). A torch.func.grad (or jvp) of functional_call with only a
# new base weight (the gradient of the loss in a base weight: sensitivity, Fisher) makes _check_current
# decompose *inside* the transform and write the transform's wrapped tensors into the layer's factor
# Parameters (`held.data = ...`): they escape the transform, and the process dies with a segmentation
# fault (or a torch INTERNAL ASSERT). The promise: a correct gradient, or an SvdtuneError, and the model
# as it was. (vmap already refuses, with torch's data-dependent-control-flow RuntimeError.)
@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_a_torch_func_transform_over_a_new_base_weight_does_not_crash_or_corrupt(transform):
    done = run_python(f"""
        import torch, svdtune
        from torch import nn
        from torch.func import functional_call, grad, jvp

        torch.manual_seed(0)
        model = svdtune.apply(nn.Sequential(nn.Linear(6, 5)), ["0"])
        with torch.no_grad():
            model[0].svd_delta.fill_(0.3)
        x, w = torch.randn(3, 6), torch.randn(5, 6)
        with torch.no_grad():
            before = model(x).clone()

        def dense(W):
            U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
            return W + U @ torch.diag(torch.relu(sigma + 0.3) - sigma) @ Vh

        w64 = w.double().requires_grad_()
        (x.double() @ dense(w64).T).sum().backward()
        try:
            if "{transform}" == "grad":
                got = grad(lambda w: functional_call(model, {{"0.weight": w}}, (x,)).sum())(w)
                torch.testing.assert_close(got.double(), w64.grad, rtol=1e-4, atol=1e-4)
            else:
                call = lambda w: functional_call(model, {{"0.weight": w}}, (x,))
                out, tangent = jvp(call, (w,), (torch.ones_like(w),))
                expected = (x.double() @ dense(w.double()).T + model[0].bias.double()).float()
                torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
            print("computed")
        except svdtune.SvdtuneError:
            print("refused")
        with torch.no_grad():
            torch.testing.assert_close(model(x), before)
        assert type(model[0].svd_U) is nn.Parameter and type(model[0].svd_U.data) is torch.Tensor
        print("model intact")
    """, timeout=60)
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stderr[-2000:]}"
    assert "model intact" in done.stdout


# 4. api.md, apply: "Raises SvdtuneError, with the model unchanged, if: targets, exclude or trainable holds
# something other than non-empty strings; ... mode is not "shift" or "scale"; svd is not one of ...". A 0-d
# tensor for a pattern list gives torch's TypeError; a NumPy array for mode or svd NumPy's ValueError.
@pytest.mark.parametrize("arguments", [
    {"targets": torch.tensor(2)},
    {"targets": "0", "exclude": torch.tensor(2)},
    {"targets": "0", "trainable": torch.tensor(2)},
    {"targets": "0", "mode": numpy.array(["shift", "scale"])},
    {"targets": "0", "svd": numpy.array(["exact", "auto"])},
], ids=["targets", "exclude", "trainable", "mode", "svd"])
def test_apply_with_arguments_of_the_wrong_type_raises_svdtune_error(arguments):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(svdtune.SvdtuneError):
        svdtune.apply(model, **arguments)
    assert type(model[0]) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_svdtune_callback_refuses_a_keep_base_weights_that_is_not_a_bool():
    pytest.importorskip("transformers")
    from svdtune.integrations.transformers import SvdtuneCallback

    with pytest.raises(svdtune.SvdtuneError, match="keep_base_weights='no' must be True or False"):
        SvdtuneCallback(keep_base_weights="no")
