"""Whole-model operations after `apply` (svdtune/adapting.py): trainable_parameters, report, set_scale,
singular_values, merge, restore."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor, nn

from svdtune.adapting import apply  # noqa: F401  (svdtune.model.apply, as before the split)
from svdtune import kinds
from svdtune.config import SpectralConfig
from svdtune.errors import SvdtuneError
from svdtune.formula import check_finite_merge, may_overflow, spectrum_shift
from svdtune.layers import SpectralLayer
from svdtune.report import SKIPPED, Report, build_report
from svdtune.sharding import refuse_sharded
from svdtune.swap import unadapt
from svdtune.transaction import writable
from svdtune.walk import (  # adapted_layers and adapted_units are also used as svdtune.model.*
    _BUFFERS, _FLAGS, _TRAINABLE, _require_adapted, adapted_layers, adapted_units, factor_ids, join_name,
    trainable_modules, unwrap,
)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to give the optimizer: every delta plus the ``trainable`` modules' parameters.

    Args:
        model: a model passed through `apply`.

    Returns:
        The parameters with ``requires_grad=True``, deltas first, each once.

    Raises:
        SvdtuneError: if the model has no svdtune layers.

    Example:
        >>> optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-3)
    """
    layers = _require_adapted(unwrap(model), "train")
    deltas = [layer.spectral_delta(part) for _, layer in layers for part in layer.spectral_parts()]
    seen = {id(p) for p in deltas} | factor_ids(unwrap(model))  # the factors: frozen whatever their flag says
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    _warn_if_trainable_since_apply(unwrap(model), seen)
    return [p for p in deltas if p.requires_grad] + others


def _warn_if_trainable_since_apply(model: nn.Module, deltas: set[int]) -> None:
    """Warn about trainable parameters that `apply` did not leave trainable: created after it, or unfrozen since.
    E.g. diffusers' fuse_qkv_projections() after apply builds new fused layers from the adapted weights; the
    attention then uses those, fully trainable, and the deltas of to_q/to_k/to_v get no gradient."""
    known, free = set(), trainable_modules(model)
    for prefix, root in model.named_modules():
        known.update(join_name(prefix, name) for name in root.__dict__.get(_FLAGS, ()))
    extra = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in deltas
             and (name not in known or name.rpartition(".")[0] not in free)]
    if extra:
        warnings.warn(
            f"{len(extra)} trainable parameters were created or unfrozen after svdtune.apply (e.g. {extra[:3]}); "
            "they are trained fully and the deltas of layers they replace get no gradient. If a library fused "
            "layers after apply (diffusers' fuse_qkv_projections()), fuse first, then apply; for a new head, "
            "create it before apply and pass apply(..., trainable=[its name]).",
            RuntimeWarning, stacklevel=3,
        )


def report(model: nn.Module) -> Report:
    """A table of the adapted layers: name, type, weight shape, rank, mode, trainable numbers, % of model.

    Args:
        model: any model; fully trainable parameters outside svdtune layers are listed too.

    Returns:
        A `Report`; ``print(report)`` shows the table, ``report.rows`` holds the data.

    Example:
        >>> print(svdtune.report(model))
    """
    return build_report(unwrap(model))


def set_scale(model: nn.Module, scale: float) -> nn.Module:
    """Set the strength s of every layer's deltas (1.0 = as trained, 0.0 = the base model).

    Args:
        model: a model passed through `apply`.
        scale: the new s: any finite number, NumPy scalar or one-element tensor (> 1 extrapolates).

    Returns:
        The same model.

    Raises:
        SvdtuneError: if the model has no svdtune layers, scale is not finite, or it makes a layer's
            adapted weight overflow its dtype (nothing changes then).

    Example:
        >>> svdtune.set_scale(model, 0.8)
    """
    layers = _require_adapted(unwrap(model), "scale")
    configs = [dataclasses.replace(layer._spectral.config, scale=scale) for _, layer in layers]
    for (name, layer), config in zip(layers, configs):
        _check_scale_fits(name, layer, config)
    for (_, layer), config in zip(layers, configs):
        layer._spectral.config = config
    return model


def _check_scale_fits(name: str, layer: SpectralLayer, config: SpectralConfig) -> None:
    """Refuse a scale at which a layer's W' may overflow its dtype (not checked on a sharded layer: reading
    its spectrum would be a collective)."""
    if layer._sharded():
        return
    for part in layer.spectral_parts():
        sigma = layer._held_factors(part).sigma
        with torch.no_grad():
            shift = spectrum_shift(sigma, layer.spectral_delta(part), config.scale, config.mode)
        dtype = layer._parameters[layer._unit(part).part.param].dtype
        if sigma.numel() and may_overflow(float(sigma.max()), shift, dtype):
            raise SvdtuneError(f"scale={config.scale:g} makes the weight of layer {kinds.unit_name(name, part)!r} "
                               f"overflow {dtype}; use a smaller scale.")


def singular_values(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The tuned singular values of each layer before and after its deltas.

    Returns:
        {unit name: (sigma, sigma_adapted)}, detached 1-D float tensors of length rank; a unit is a layer,
        or a part of one ("<attention>.q_proj", see `adapted_units`).

    Raises:
        SvdtuneError: if the model has no svdtune layers.
    """
    with torch.no_grad():
        return {
            kinds.unit_name(name, part): (layer._factors(part).sigma.clone(), layer.spectrum(part).clone())
            for name, layer in _require_adapted(unwrap(model), "inspect") for part in layer.spectral_parts()
        }


def merge(model: nn.Module) -> nn.Module:
    """Bake the deltas into plain layers of the original classes, in place.

    Every merged weight is computed (in float32 or better) and checked to be
    finite before any layer is changed. Parameters get back the ``requires_grad``
    they had before `apply`.

    Args:
        model: a model passed through `apply`.

    Returns:
        The same model, with no svdtune layers left: save it with ``torch.save`` or
        safetensors and load it into the original architecture without svdtune.

    Raises:
        SvdtuneError: if the model has no svdtune layers or a merged weight is not finite.

    Example:
        >>> svdtune.merge(model)
        >>> torch.save(model.state_dict(), "merged.pt")
    """
    wrapper, model = model, unwrap(model)
    refuse_sharded(model, "merge", "save the delta with svdtune.save_delta (on every rank) and merge it into a "
                   "plain model (load_delta, then merge) or offline with svdtune merge BASE DELTA -o OUT.")
    layers = _require_adapted(model, "merge")
    with torch.no_grad():
        weights = {name: layer.merged_params() for name, layer in layers}
    for name, params in weights.items():
        for param, weight in params.items():
            check_finite_merge(name if param == "weight" else f"{name}.{param}", weight)
    for name, layer in layers:
        unadapt(layer, weights[name])
    _restore_flags(model)
    return wrapper


def restore(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original layer classes and their untouched weights, in place.

    The modules are the same objects as before `apply`; their weights are the same
    tensors, bit for bit; parameters get back the ``requires_grad`` they had. The
    deltas are dropped (save them first with `save_delta` if needed); parameters of
    ``trainable`` modules and buffers changed by training keep their new values.

    Returns:
        The same model.

    Raises:
        SvdtuneError: if the model has no svdtune layers.

    Example:
        >>> svdtune.restore(model)
    """
    wrapper, model = model, unwrap(model)
    refuse_sharded(model, "restore", "restore the model before fully_shard, or rebuild the plain model.")
    for _, layer in _require_adapted(model, "restore"):
        unadapt(layer)
    _restore_flags(model)
    return wrapper


def _restore_flags(model: nn.Module) -> None:
    """Give back the requires_grad recorded by `apply`, wherever in the tree it was called."""
    for root in list(model.modules()):
        root.__dict__.pop(_BUFFERS, None)
        root.__dict__.pop(_TRAINABLE, None)
        root.__dict__.pop(SKIPPED, None)
        flags = root.__dict__.pop(_FLAGS, None)
        for name, param in root.named_parameters() if flags is not None else ():
            with writable(param):  # an inference tensor's flag can be set only inside inference_mode
                param.requires_grad_(flags.get(name, param.requires_grad))
