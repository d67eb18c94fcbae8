"""`apply`: select layers, check them, decompose them, and adapt them in one transaction."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from svdtune import kinds
from svdtune.arguments import as_optional_path
from svdtune.cache import decompose_layers
from svdtune.config import SpectralConfig
from svdtune.decompose import Decomposition, check_svd_choice, warn_if_degenerate, warn_if_slow_svd
from svdtune.errors import SvdtuneError
from svdtune.fingerprint import FLOATS
from svdtune.integrations import guard
from svdtune.layers import SpectralLayer, added_names
from svdtune.randomized import RandomizedSVD
from svdtune.report import SKIPPED
from svdtune.sharding import refuse_sharded
from svdtune.swap import adapt
from svdtune.targets import as_patterns, count_kinds, describe_counts, select, unadaptable
from svdtune.transaction import Progress, all_or_nothing
from svdtune.walk import _PARALLEL, _TRAINABLE, _wrapper_chain, root_record, unwrap


def apply(
    model: nn.Module,
    targets: str | Iterable[str],
    exclude: str | Iterable[str] = (),
    rank: int | None = None,
    mode: str = "shift",
    *,
    trainable: str | Iterable[str] = (),
    cache_dir: str | os.PathLike | None = None,
    svd: str | RandomizedSVD = "auto",
    progress: bool = True,
) -> nn.Module:
    """Adapt the selected layers in place: freeze everything, train one delta per singular value.

    Each selected layer of a supported kind (``nn.Linear``, ``nn.ConvNd``,
    ``nn.ConvTransposeNd``, transformers' ``Conv1D``, ``nn.Embedding``,
    ``nn.EmbeddingBag``, ``nn.MultiheadAttention``'s q/k/v projections, or a
    subclass; see `svdtune.kinds`) keeps its object identity, class ancestry and
    state-dict keys, and gains a parameter ``svd_delta`` of zeros (attention:
    ``svd_delta_q_proj``/``_k_proj``/``_v_proj``), so the model's output is unchanged
    until training. Every other parameter is frozen, except those of ``trainable``
    modules. Modules the patterns match that svdtune cannot adapt (with parameters
    of their own and no supported layer inside, e.g. LayerNorm) get one warning
    with their kinds and count, and `report` lists them.

    Args:
        model: any module; changed in place.
        targets: glob patterns over ``named_modules()`` names; a pattern also
            matches a trailing dotted part of a name (``"fc*"`` selects ``head.fc2``).
        exclude: patterns (same rule) of layers to leave alone.
        rank: tune only the top ``rank`` singular values of each layer (capped at the
            layer's min(m, n)); only those singular vectors are stored. None: all. Large
            embeddings: pass a rank (a full SVD of over 10^8 entries warns with its time).
        mode: "shift" (sigma' = relu(sigma + s*delta), SVDiff) or "scale"
            (sigma' = sigma * (1 + s*delta)).
        trainable: patterns of modules whose own parameters stay fully trainable
            (e.g. a new head); they must not be targets.
        cache_dir: a folder to store and reuse decompositions in (keyed by the
            weight's bytes, shape, dtype, rank and algorithm); None computes every SVD.
        svd: how the top ``rank`` singular triplets are computed: "auto" (the randomized
            SVD where rank + 16 <= min(m, n) / 4 and min(m, n) >= 512, else the exact one),
            "exact" (always ``torch.linalg.svd``), "randomized", or a `RandomizedSVD` with
            your parameters. A delta file records the method, and loading reproduces it.
        progress: show a progress bar on a terminal when decomposing takes over a second.

    Returns:
        The same model object.

    Raises:
        SvdtuneError: a pattern selects nothing (the message lists similar names),
            a layer is already adapted or cannot be (lazy, parametrized, empty, non-finite
            or tied weight, an embedding with max_norm, an attribute named svd_delta,
            inference tensors), a layer is both a target and trainable, or bad
            rank/mode/argument types. The model is unchanged when it is raised (the
            changes run in one `all_or_nothing` transaction, rolled back on any failure).

    Warns:
        RuntimeWarning: naming layers with numerically zero tuned singular values (e.g. an
            all-zero weight), which are better trained fully with ``trainable=``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> model = svdtune.apply(model, targets=["0", "2"])
        >>> optimizer = torch.optim.AdamW(svdtune.trainable_parameters(model), lr=1e-3)
    """
    parallel = [type(m).__name__ for m in _wrapper_chain(model) if isinstance(m, _PARALLEL)]
    if parallel:
        raise SvdtuneError(f"apply got a model wrapped in {parallel[0]}, which records its parameters when built, so "
                           "deltas added now would not be synchronised; call apply on the model first, then wrap it.")
    wrapper, model = model, unwrap(model)
    refuse_sharded(model, "svdtune.apply", "call svdtune.apply before fully_shard.")
    refuse_lazy(model, "svdtune.apply")
    config = SpectralConfig(mode=mode, rank=rank)
    check_svd_choice(svd)
    if not isinstance(progress, bool):
        raise SvdtuneError(f"progress={progress!r:.40} must be True (a progress bar on a terminal) or False.")
    targets, exclude = as_patterns(targets, "targets"), as_patterns(exclude, "exclude")
    layers = select(model, targets, exclude)
    found = unadaptable(model, targets, exclude)  # {name: class} of what the patterns meet but cannot adapt
    if not layers:
        skipped = describe_counts(count_kinds(found.values()))
        left = f"; it matches only modules svdtune cannot adapt ({skipped})" if found else ""
        raise SvdtuneError(
            f"targets={list(targets)} with exclude={list(exclude)} leaves no layer to adapt{left}; "
            f"name at least one layer of a supported kind ({kinds.supported_names()})."
        )
    free = _select_trainable(model, as_patterns(trainable, "trainable"), layers)
    cache_dir = as_optional_path(cache_dir, "cache_dir")
    record = root_record(model)
    for name, layer in layers.items():
        _check_adaptable(name, layer)
    _check_trainable(layers, free)
    check_not_shared(model, layers)
    skipped = {n: cls for n, cls in found.items() if not _inside(n, free)}
    with torch.inference_mode(False):  # called inside inference_mode too, the deltas are tensors autograd can train
        factors = decompose_parts(layers, rank, cache_dir, svd, mode, progress)
        # Nothing above changed the model; nothing below is meant to fail, and if it does, it is undone.
        with all_or_nothing(model, "svdtune.apply") as step:
            plan = [(name, layer, factors[name], config) for name, layer in layers.items()]
            adapt_layers(model, plan, cache_dir, record, step)
            for name, module in free.items():
                step.current = f"trainable module {name!r}"
                module.requires_grad_(True)
            model.__dict__[_TRAINABLE] = sorted({*model.__dict__.get(_TRAINABLE, ()), *free})
    _note_skipped(model, skipped)
    return wrapper


def refuse_lazy(model: nn.Module, action: str) -> None:
    """Refuse a model with a lazy module not yet run: its parameters cannot be frozen (``requires_grad_``)."""
    lazy = next((name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:
        raise SvdtuneError(f"{action}: parameter {lazy!r} belongs to a lazy module not initialized yet; run one forward "
                           "pass with a dummy batch first.")


def _check_trainable(layers: dict[str, nn.Module], free: dict[str, nn.Module]) -> None:
    """Refuse to train inference tensors (of a model built under ``torch.inference_mode()``): autograd cannot use them."""
    tensors = [(f"layer {n!r}", m._parameters[part.param]) for n, m in layers.items()
               for part in kinds.kind_of(m).parts(m)]
    tensors += [(f"trainable module {n!r}", p) for n, m in free.items() for p in m.parameters()]
    for what, tensor in tensors:
        if tensor.is_inference():
            raise SvdtuneError(
                f"{what} holds inference tensors (the model was built under torch.inference_mode()), which autograd "
                "cannot train; build the model outside inference_mode (torch.no_grad() saves the memory too), or, to "
                "serve a trained delta, use svdtune.load_delta, which supports such models."
            )


def decompose_parts(
    layers: dict[str, nn.Module], rank: int | None, cache_dir: str | None, svd: str | RandomizedSVD, mode: str,
    progress: bool,
) -> dict[str, dict[str, Decomposition]]:
    """{layer name: {part name: decomposition}} of every layer's matrices (see `svdtune.kinds`), with one
    progress bar, warning before a slow full SVD and about numerically zero singular values."""
    units = {}  # unit name -> (layer name, part name, matrix)
    for name, layer in layers.items():
        kind = kinds.kind_of(layer)
        for part in kind.parts(layer):
            matrix = kinds.matrix(kind, layer._parameters[part.param], part)
            units[kinds.unit_name(name, part.name)] = (name, part.name, matrix)
            if svd != "randomized" and not isinstance(svd, RandomizedSVD):
                warn_if_slow_svd(kinds.unit_name(name, part.name), tuple(matrix.shape), rank, matrix.device)
    decomposed = decompose_layers({unit: matrix for unit, (_, _, matrix) in units.items()}, rank, cache_dir, svd, progress)
    warn_if_degenerate(decomposed, mode)
    factors: dict[str, dict[str, Decomposition]] = {name: {} for name in layers}
    for unit, (name, part, _) in units.items():
        factors[name][part] = decomposed[unit]
    return factors


def _inside(name: str, modules: dict[str, nn.Module]) -> bool:
    """True if the module ``name`` is one of ``modules`` (by name) or inside one."""
    return any(name == top or name.startswith(top + ".") for top in modules)


def _note_skipped(model: nn.Module, skipped: dict[str, str]) -> None:
    """Warn once about what the patterns matched but svdtune cannot adapt ({name: class}); `report` lists it too."""
    if not skipped:
        return
    model.__dict__[SKIPPED] = {**model.__dict__.get(SKIPPED, {}), **skipped}
    warnings.warn(
        f"the targets also match {len(skipped)} modules svdtune cannot adapt, left frozen: "
        f"{describe_counts(count_kinds(skipped.values()))}; train them fully with apply(..., trainable=[...]) if they need to change, "
        "or name the layers to adapt more narrowly to silence this.",
        UserWarning, stacklevel=3,
    )


def adapt_layers(
    model: nn.Module, plan: list[tuple[str, nn.Module, Decomposition, SpectralConfig]], cache_dir: str | None,
    record: dict[str, object], progress: Progress,
) -> None:
    """Adapt layers already checked and decomposed: the part of `apply` that is not meant to fail
    (run it inside `all_or_nothing`). ``plan`` holds (name, layer, factors, config).

    With a `root_record` (the first time), it is stored on the model and the whole model is frozen.
    """
    if record:
        model.__dict__.update(record)
        model.requires_grad_(False)
        guard.install(model)  # warns on save_pretrained of the unmerged model
    for name, layer, factors, config in plan:
        progress.current = f"layer {name!r}"
        layer.requires_grad_(False)
        adapt(layer, factors, config, cache_dir)


def _select_trainable(model: nn.Module, patterns: tuple[str, ...], layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    if not patterns:
        return {}
    modules = select(model, patterns, (), lambda module: True, "trainable")
    for name, module in modules.items():
        clash = [n for n, m in module.named_modules(prefix=name) if n in layers or isinstance(m, SpectralLayer)]
        if clash:
            raise SvdtuneError(
                f"{clash[0]!r} is both a target and inside trainable module {name!r}; "
                "a layer is either spectrally tuned or fully trained: drop it from one list."
            )
    return modules


def _check_adaptable(name: str, layer: nn.Module) -> None:
    if isinstance(layer, SpectralLayer):
        raise SvdtuneError(
            f"layer {name!r} is already adapted by svdtune; exclude it, or call svdtune.restore(model) first."
        )
    if getattr(layer, "max_norm", None) is not None:  # nn.Embedding, nn.EmbeddingBag
        raise SvdtuneError(
            f"layer {name!r} has max_norm={layer.max_norm}, which renormalizes looked-up rows of its weight in place "
            "at every forward; a decomposed, frozen weight cannot be edited so: set max_norm=None (renormalize the "
            "rows once beforehand if needed), train it fully with trainable=[...], or exclude it."
        )
    kind = kinds.kind_of(layer)
    for param in dict.fromkeys(part.param for part in kind.parts(layer)):
        where = name if param == "weight" else f"{name}.{param}"
        weight = layer._parameters.get(param)
        if not isinstance(weight, nn.Parameter):
            raise SvdtuneError(
                f"layer {where!r} has no plain {param!r} parameter (parametrized or weight-normed?); "
                "remove the parametrization first or exclude the layer."
            )
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise SvdtuneError(f"layer {where!r} is lazy and not initialized yet; run one forward pass before apply.")
        if weight.is_meta:
            raise SvdtuneError(
                f"layer {where!r} is on the meta device and has no values to decompose; "
                "materialize and load the weights first (model.to_empty(device=...) and load_state_dict)."
            )
        if weight.dim() != kind.ndim:
            raise SvdtuneError(f"layer {where!r} has a {weight.dim()}-D weight, but a {kind.name} has "
                               f"{kind.ndim}-D weights; exclude it.")
        if weight.numel() == 0:
            raise SvdtuneError(f"layer {where!r} has a weight of shape {list(weight.shape)}, which has no singular "
                               "values to tune (it is empty); exclude the layer.")
        if weight.dtype not in FLOATS:
            raise SvdtuneError(f"layer {where!r} has a {weight.dtype} weight; svdtune tunes the singular values of "
                               "float16, bfloat16, float32 or float64 weights: cast the layer (e.g. .to(torch.bfloat16)) "
                               "or exclude it.")
    names = added_names([part.name for part in kind.parts(layer)])
    taken = [n for n in names if n in layer._parameters or n in layer._buffers or n in layer._modules or n in layer.__dict__ or hasattr(type(layer), n)]
    if taken:
        raise SvdtuneError(f"layer {name!r} already has an attribute {taken[0]!r}, the parameter svdtune adds; "
                           "rename that attribute or exclude the layer.")


def check_not_shared(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Refuse a layer reachable under two names, or whose weight is tied to another parameter:
    adapting it under one name would leave the other copy (and its checkpoint key) unadapted."""
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    param_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(param), []).append(name)
    for name, layer in layers.items():
        others = [n for n in module_names.get(id(layer), []) if n != name]
        if others:
            raise SvdtuneError(
                f"layer {name!r} is shared: the same module is also {others[0]!r}; svdtune cannot adapt one name "
                "without the other: use separate modules, or exclude both names."
            )
        for param in dict.fromkeys(part.param for part in kinds.kind_of(layer).parts(layer)):
            tied = [n for n in param_names.get(id(layer._parameters[param]), []) if n != f"{name}.{param}"]
            if tied:
                raise SvdtuneError(
                    f"layer {name!r} has its {param} tied to {tied[0]!r} (tied input/output embeddings?); untie it "
                    f"first, e.g. {name}.{param} = nn.Parameter({name}.{param}.detach().clone()) (for a transformers "
                    "model also set model.config.tie_word_embeddings = False, or load it with "
                    "tie_word_embeddings=False, so that it stays untied), or exclude the layer."
                )
