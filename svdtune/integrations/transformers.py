"""svdtune with Hugging Face transformers: the delta in every Trainer checkpoint, and saving the merged model.

This module imports transformers; ``import svdtune`` does not import it. Use::

    from svdtune.integrations.transformers import SvdtuneCallback, save_merged

    svdtune.apply(model, targets=["q_proj", "v_proj"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SvdtuneCallback()])
    trainer.train()                      # checkpoint-N/ holds svdtune_delta.safetensors too
    save_merged(model, "merged")         # a plain checkpoint: AutoModel.from_pretrained("merged") works
"""

from __future__ import annotations

import glob
import os

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from svdtune.errors import SvdtuneError
from svdtune.io import save_delta
from svdtune.formula import check_finite_merge
from svdtune.layers import delta_name
from svdtune.sharding import sharded_tensors
from svdtune.writing import atomic_write
from svdtune.walk import adapted_layers, own_persistent_buffers, join_name, unwrap

DELTA_FILE = "svdtune_delta.safetensors"  # the delta file the callback writes into each checkpoint folder
_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


class SvdtuneCallback(TrainerCallback):
    """Write the model's delta file (`svdtune.save_delta`) into every checkpoint the Trainer saves.

    Args:
        keep_base_weights: True (default) leaves the Trainer's checkpoint as it is (base weights plus
            ``svd_delta`` keys: ``trainer.train(resume_from_checkpoint=...)`` resumes from it) and adds
            ``svdtune_delta.safetensors``. False keeps only what training changes: the weights file is
            replaced by one holding only the trained tensors (deltas, fully trained parameters and their
            modules' buffers) under their state-dict names. That is all ``resume_from_checkpoint`` needs
            when the model is built from the same base and adapted the same way before ``train``; resuming
            logs the base weights as "missing keys" (they are the model's own). Such a folder is not a
            model: ``from_pretrained`` on it would initialise the base weights randomly (transformers warns
            "newly initialized"); load its ``svdtune_delta.safetensors`` into the base model instead.
        metadata: notes stored in each delta file (the step is added as ``global_step``).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   callbacks=[SvdtuneCallback(keep_base_weights=False)])
        >>> trainer.train()
        >>> trainer.train(resume_from_checkpoint=True)   # resumes from the small checkpoint
    """

    def __init__(self, keep_base_weights: bool = True, metadata: dict[str, str] | None = None) -> None:
        if not isinstance(keep_base_weights, bool):
            raise SvdtuneError(f"keep_base_weights={keep_base_weights!r:.40} must be True or False.")
        self.keep_base_weights = keep_base_weights
        self.metadata = dict(metadata or {})

    def on_save(self, args, state, control, model: nn.Module | None = None, **kwargs):
        # Under FSDP2 every process takes part in save_delta's gathering, and rank 0 writes (svdtune.sharding).
        sharded = model is not None and bool(sharded_tensors(unwrap(model)))
        if model is None or not (args.should_save or sharded):
            return control
        if sharded and not self.keep_base_weights:
            raise SvdtuneError("SvdtuneCallback(keep_base_weights=False) cannot rewrite the checkpoint of a model "
                               "sharded by FSDP2; use keep_base_weights=True (the delta file is written all the same).")
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and not os.path.isdir(folder):
            raise SvdtuneError(f"SvdtuneCallback found no checkpoint folder {folder!r} to write the delta into; "
                               "it supports checkpoints under TrainingArguments.output_dir (no hyperparameter search).")
        save_delta(model, os.path.join(folder, DELTA_FILE), {**self.metadata, "global_step": str(state.global_step)})
        if not self.keep_base_weights:
            keep_only_trained(model, folder)
        return control


def trained_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries training changes: every parameter with ``requires_grad`` (the deltas and
    fully trained parameters) and the persistent buffers of the modules holding them. Detached CPU copies."""
    model = unwrap(model)
    modules, entries = dict(model.named_modules()), {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            owner = name.rpartition(".")[0]
            entries[name] = param
            entries.update((join_name(owner, b), buf) for b, buf in own_persistent_buffers(modules[owner]))
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in entries.items()}


def keep_only_trained(model: nn.Module, folder: str | os.PathLike) -> None:
    """Replace a Trainer checkpoint's weights by `trained_state_dict` (``model.safetensors``); the config,
    optimizer, scheduler and trainer state stay. The new file replaces ``model.safetensors`` atomically
    (`svdtune.writing.atomic_write`) before the other weight files are removed: a crash leaves weights."""
    folder = os.fspath(folder)
    target = os.path.join(folder, "model.safetensors")
    data = safetensors.torch.save(trained_state_dict(model),
                                  metadata={"format": "pt", "svdtune": "trained tensors only, no base weights"})
    atomic_write(target, [data])
    for pattern in _WEIGHTS:
        for path in glob.glob(os.path.join(folder, pattern)):
            if os.path.abspath(path) != os.path.abspath(target):
                os.remove(path)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as `svdtune.merge` would leave it, without changing the model: each adapted
    parameter (``weight``; an attention's ``in_proj_weight``...) is W' (computed as merge does) and the
    deltas' keys (``svd_delta``, ``svd_delta_q_proj``...) are gone.

    Raises:
        SvdtuneError: the model has no svdtune layers, or a merged weight is not finite.
    """
    model = unwrap(model)
    layers = list(adapted_layers(model))
    if not layers:
        raise SvdtuneError("the model has no svdtune layers to merge; save it with save_pretrained as it is.")
    state = model.state_dict()
    with torch.no_grad():
        for name, layer in layers:
            for param, weight in layer.merged_params().items():
                check_finite_merge(name, weight)
                state[join_name(name, param)] = weight
            for part in layer.spectral_parts():
                del state[join_name(name, delta_name(part))]
    return state


def save_merged(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` of the merged model, leaving ``model`` adapted: no copy of the model is
    made, only the merged weights of the adapted layers are held until written.

    The folder loads into the plain class: ``type(model).from_pretrained(save_directory)`` gives the
    adapted model's outputs with no svdtune installed.

    Args:
        model: a transformers ``PreTrainedModel`` passed through `svdtune.apply`.
        save_directory: the folder, as for ``save_pretrained``.
        **kwargs: passed on to ``save_pretrained`` (``max_shard_size``, ``safe_serialization``, ...).

    Raises:
        SvdtuneError: the model has no svdtune layers or no ``save_pretrained``, or a merged weight is not finite.

    Example:
        >>> save_merged(model, "merged")
        >>> plain = AutoModelForCausalLM.from_pretrained("merged")
    """
    inner = unwrap(model)
    if not callable(getattr(inner, "save_pretrained", None)):
        raise SvdtuneError(f"{type(inner).__name__} has no save_pretrained; use svdtune.merge(model) and torch.save.")
    inner.save_pretrained(save_directory, state_dict=merged_state_dict(inner), **kwargs)
