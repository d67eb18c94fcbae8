"""What svdtune records on a model and how it walks one: wrappers, records, buffers, adapted layers.

`apply` records on the root model (in its ``__dict__``) the ``requires_grad`` flags, buffer digests and
trainable modules it found, for `merge`, `restore` and `save_delta`; these helpers read them back.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterator

from torch import Tensor, nn

from svdtune import container, kinds
from svdtune.arguments import as_module
from svdtune.errors import SvdtuneError
from svdtune.layers import SpectralLayer

# What the first apply records on the root model (its __dict__), for merge, restore and save_delta:
_FLAGS = "_svdtune_requires_grad"  # {parameter name: requires_grad before apply}
_BUFFERS = "_svdtune_buffers"  # {persistent buffer name: (dtype, sha256 of its bytes)} at apply
_TRAINABLE = "_svdtune_trainable"  # names of the modules apply(trainable=...) keeps fully trainable
_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel`` wrappers,
    so that layer names carry no ``_orig_mod.``/``module.`` prefix (a delta then fits the plain model)."""
    return _wrapper_chain(model)[-1]


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """[model, the module it wraps, ..., the innermost module that is no wrapper]."""
    chain = [as_module(model, "svdtune")]
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported once anything was compiled
    while True:
        if eval_frame is not None and isinstance(chain[-1], eval_frame.OptimizedModule):
            chain.append(chain[-1]._orig_mod)
        elif isinstance(chain[-1], _PARALLEL):
            chain.append(chain[-1].module)
        else:
            return chain


def root_record(model: nn.Module) -> dict[str, object]:
    """What the first `apply` on ``model`` records on it, computed before anything changes;
    {} if it was adapted before (then later calls freeze only the layers they adapt)."""
    if _FLAGS in model.__dict__:
        return {}
    return {
        _FLAGS: {name: p.requires_grad for name, p in model.named_parameters()},
        _BUFFERS: {name: _digest(b) for name, b in persistent_buffers(model) if b.device.type != "meta"},
        _TRAINABLE: [],
    }


def _digest(tensor: Tensor) -> tuple[str, str]:
    return str(tensor.dtype), hashlib.sha256(container.tensor_bytes(tensor)).hexdigest()


def persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(qualified name, buffer) for every buffer that goes into the state dict."""
    for module_name, module in model.named_modules():
        for name, buffer in own_persistent_buffers(module):
            yield join_name(module_name, name), buffer


def own_persistent_buffers(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, buffer) for the module's own buffers (not its children's) that go into the state dict."""
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def trainable_modules(model: nn.Module) -> set[str]:
    """The names of the modules `apply(trainable=...)` keeps trainable, and of all modules inside them."""
    names = set()
    for prefix, root in model.named_modules():
        for name in root.__dict__.get(_TRAINABLE, ()):
            top = join_name(prefix, name)
            names.update(join_name(top, inner) for inner, _ in model.get_submodule(top).named_modules())
    return names


def join_name(prefix: str, name: str) -> str:
    """A qualified name: "head" + "0" -> "head.0"; either may be "" (the root)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def warn_if_buffers_changed(model: nn.Module, saved: set[str]) -> None:
    """Warn if persistent buffers outside ``saved`` changed since `apply` (BatchNorm statistics
    updated in train mode): the delta file does not hold them, so a reload would differ.
    A buffer whose dtype changed since (``model.to(dtype)``) cannot be compared and is skipped."""
    for prefix, root in model.named_modules():
        before = root.__dict__.get(_BUFFERS, {})
        named = ((join_name(prefix, name), name, buffer) for name, buffer in persistent_buffers(root))
        changed = [full for full, name, buffer in named if full not in saved and name in before
                   and before[name][0] == str(buffer.dtype) and before[name] != _digest(buffer)]
        if changed:
            warnings.warn(
                f"buffers {changed[:3]} changed since svdtune.apply (e.g. BatchNorm running statistics updated in "
                "train mode) and are not in the delta file, so loading it into the base model gives a different "
                "model; keep frozen BatchNorm layers in eval mode while training, or pass their modules as "
                "apply(..., trainable=[...]) so their statistics are saved.",
                RuntimeWarning, stacklevel=3,
            )
            return


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, SpectralLayer]]:
    """(qualified name, layer) for every svdtune layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            yield name, module


def adapted_units(model: nn.Module) -> Iterator[tuple[str, SpectralLayer, str]]:
    """(unit name, layer, part) for every unit of every svdtune layer: a layer of one matrix is one unit
    named as the layer (part ""); nn.MultiheadAttention gives "<name>.q_proj", ".k_proj", ".v_proj"."""
    for name, layer in adapted_layers(model):
        for part in layer.spectral_parts():
            yield kinds.unit_name(name, part), layer, part


def factor_ids(model: nn.Module) -> set[int]:
    """The ids of every adapted layer's factor parameters (U, sigma, Vh): frozen, never trained or saved."""
    return {id(layer._parameters[name]) for _, layer in adapted_layers(model)
            for name in layer._factor_names()}


def _require_adapted(model: nn.Module, action: str) -> list[tuple[str, SpectralLayer]]:
    layers = list(adapted_layers(model))
    if not layers:
        raise SvdtuneError(f"the model has no svdtune layers to {action}; call svdtune.apply(model, targets=...) first.")
    return layers
