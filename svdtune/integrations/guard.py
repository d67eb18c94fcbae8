"""A warning for ``save_pretrained`` on a model that still holds svdtune layers.

transformers' and diffusers' ``save_pretrained`` write ``model.state_dict()``: the base weights plus the
``svd_delta`` keys. ``from_pretrained`` into the plain class reports those keys as unexpected and returns
the *base* model, so the fine-tune is silently lost. `install` (called by the first `svdtune.apply` on a
model) adds a state-dict pre-hook that warns when the state dict is taken inside a ``save_pretrained``
call, except inside the Trainer's own checkpointing, where base weights plus deltas are exactly what
resuming needs. ``torch.save(model.state_dict())`` and DistributedDataParallel are left alone.
No third-party library is imported: the hook looks for the calling frame by name.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

from svdtune.layers import SpectralLayer

_SAVE = "save_pretrained"
_CHECKPOINT = "_save_checkpoint"  # transformers.Trainer writing checkpoint-N (resumable as it is)
_DEPTH = 40  # frames searched above state_dict()


def install(model: nn.Module) -> None:
    """Add the save_pretrained warning to ``model`` (once; the hook is a module-level function, so an
    adapted model still pickles and deep-copies)."""
    if warn_on_save_pretrained not in model._state_dict_pre_hooks.values():
        model.register_state_dict_pre_hook(warn_on_save_pretrained)


def warn_on_save_pretrained(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: warn if called from ``save_pretrained`` while svdtune layers remain."""
    if not _inside_save_pretrained() or not any(isinstance(m, SpectralLayer) for m in module.modules()):
        return
    warnings.warn(
        "save_pretrained of a model with svdtune layers writes the base weights plus 'svd_delta' keys; "
        "from_pretrained into the plain class drops the deltas (as unexpected keys) and returns the base model. "
        "Save the merged model instead: svdtune.integrations.transformers.save_merged(model, directory) "
        "(or svdtune.merge(model) first), or only the deltas: svdtune.save_delta(model, 'delta.safetensors').",
        UserWarning, stacklevel=3,
    )


def _inside_save_pretrained() -> bool:
    frame, names = sys._getframe(2), []
    for _ in range(_DEPTH):
        if frame is None:
            break
        names.append(frame.f_code.co_name)
        if frame.f_code.co_name == _CHECKPOINT:
            return False
        frame = frame.f_back
    return _SAVE in names
