"""Checks of the public functions' arguments: each wrong type or value is an SvdtuneError naming it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from svdtune.errors import SvdtuneError


def as_path(path: object, what: str) -> str:
    """``path`` (str, bytes or os.PathLike) as a str path.

    Raises:
        SvdtuneError: it is anything else, or empty.
    """
    try:
        name = os.fsdecode(os.fspath(path))
    except TypeError:
        raise SvdtuneError(f"{what} must be a file path (str or os.PathLike), got {type(path).__name__} {path!r:.80}.") from None
    if not name or "\0" in name:
        raise SvdtuneError(f"{what} must be a non-empty file path without NUL characters, got {name!r:.80}.")
    return name


def as_optional_path(path: object, what: str) -> str | None:
    """`as_path`, with None kept as None (e.g. ``cache_dir=None``)."""
    return None if path is None else as_path(path, what)


def as_metadata(metadata: object) -> dict[str, str]:
    """The user's ``metadata=`` as a new dict of str -> str; None is {}.

    Raises:
        SvdtuneError: it is not a mapping of str to str.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SvdtuneError("metadata must map str to str; convert the values with str() or json.dumps().")
    return dict(metadata)


def as_module(model: object, action: str) -> nn.Module:
    """``model`` if it is an nn.Module.

    Raises:
        SvdtuneError: it is anything else.
    """
    if not isinstance(model, nn.Module):
        raise SvdtuneError(f"{action} needs a torch.nn.Module, got {type(model).__name__}; pass the model itself.")
    return model
