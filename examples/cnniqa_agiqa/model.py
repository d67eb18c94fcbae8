"""CNNIQA (Kang et al., CVPR 2014) with the layer names IQA-PyTorch uses.

One 7x7 convolution, global max and min pooling of its 50 maps, and three
fully connected layers. Inputs are RGB in [0, 1], any spatial size >= 7.
The state-dict keys are exactly conv1.{weight,bias} and fc1..fc3.{weight,bias},
so IQA-PyTorch's published checkpoints (e.g. CNNIQA_koniq10k-e6f14c91.pth,
a {"params": state_dict} dict) load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svdtune import container
from svdtune.errors import SvdtuneError
from svdtune.checkpoints import BASE_SUFFIXES, read_state_dict

from examples.cnniqa_agiqa.progress import say

__all__ = ["CNNIQA", "load_pretrained", "save_plain", "save_pyiqa", "EXPECTED_SHAPES", "PARALLEL_PREFIX"]

# Key -> shape of the reference architecture (ker_size 7, 50 kernels, 800 nodes).
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (50, 3, 7, 7),
    "conv1.bias": (50,),
    "fc1.weight": (800, 100),
    "fc1.bias": (800,),
    "fc2.weight": (800, 800),
    "fc2.bias": (800,),
    "fc3.weight": (1, 800),
    "fc3.bias": (1,),
}
PARALLEL_PREFIX = "module."  # what (Distributed)DataParallel puts before every key of a saved state dict


class CNNIQA(nn.Module):
    """The CNNIQA regressor: image (B, 3, H, W) in [0, 1] -> score (B,).

    Args:
        kernels: number of conv1 filters (50 in the reference model).
        kernel_size: conv1 kernel size (7).
        hidden: width of fc1 and fc2 (800).
        dropout: dropout probability after fc1 (0.5).
    """

    def __init__(self, kernels: int = 50, kernel_size: int = 7, hidden: int = 800, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, kernels, kernel_size)  # no padding, as in the reference
        self.fc1 = nn.Linear(2 * kernels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score a batch of images.

        Args:
            x: (B, 3, H, W) RGB in [0, 1], H and W at least the kernel size.

        Returns:
            (B,) predicted quality.
        """
        h = self.conv1(x)  # (B, 3, H, W) -> (B, K, H-6, W-6)
        h_max = torch.amax(h, dim=(2, 3))  # (B, K) global max pooling
        h_min = torch.amin(h, dim=(2, 3))  # (B, K) global min pooling
        h = torch.cat((h_max, h_min), dim=1)  # (B, 2K)
        h = self.dropout(F.relu(self.fc1(h)))  # (B, hidden)
        h = F.relu(self.fc2(h))
        return self.fc3(h).squeeze(1)  # (B, 1) -> (B,)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict with svdtune's reader (.safetensors, or a torch file with {"params": sd} unwrapped)."""
    try:
        return read_state_dict(path)
    except SvdtuneError as error:
        raise ValueError(
            f"could not read pretrained weights {path}: {error} Pass IQA-PyTorch's .pth ({{'params': state_dict}}), "
            f"a bare state dict ({', '.join(s for s in BASE_SUFFIXES if s != '.safetensors')}) or a .safetensors file."
        ) from None


def _strip_parallel_prefix(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop the 'module.' prefix (DataParallel) from the keys that carry it, as IQA-PyTorch does, with a note."""
    prefixed = [k for k in state if k.startswith(PARALLEL_PREFIX)]
    if not prefixed:
        return state
    say(f"note: {path}: {len(prefixed)} of {len(state)} keys start with {PARALLEL_PREFIX!r} (saved from "
        "DataParallel); reading them without it, as IQA-PyTorch's load_pretrained_network does")
    return {k[len(PARALLEL_PREFIX):] if k.startswith(PARALLEL_PREFIX) else k: v for k, v in state.items()}


def _check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Raise a ValueError naming every missing, unexpected or misshaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append("wrong shapes " + "; ".join(misshaped))
    if problems:
        raise ValueError(
            f"{path} is not a CNNIQA checkpoint: " + ", ".join(problems) + ". Expected exactly the keys "
            f"{sorted(expected)} (IQA-PyTorch's CNNIQA with ker_size=7, n_kers=50, n1/n2_nodes=800)."
        )


def load_pretrained(model: CNNIQA, path: str | Path) -> CNNIQA:
    """Load CNNIQA weights into `model`, checking every key and shape first.

    Args:
        model: the CNNIQA to fill (plain, before svdtune.apply).
        path: IQA-PyTorch .pth ({"params": state_dict}), a bare state-dict
            .pth/.pt, or a .safetensors file. Keys that start with 'module.'
            (a DataParallel checkpoint) are read without it, with a note on stderr.

    Returns:
        The same model, for chaining.

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: the path is a folder.
        ValueError: unreadable file, or wrong/missing/extra keys or shapes.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"pretrained weights {path} is a directory; pass the checkpoint file itself, "
            f"e.g. --pretrained {path}/CNNIQA_koniq10k-e6f14c91.pth"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {path} not found; download IQA-PyTorch's CNNIQA_koniq10k-e6f14c91.pth "
            "(see examples/cnniqa_agiqa/README.md) or drop --pretrained"
        )
    state = _strip_parallel_prefix(_read_state_dict(path), path)
    _check_state_dict(state, model, path)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def save_plain(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a plain (unadapted or merged) CNNIQA as safetensors, atomically.

    The file is written to a temporary file in the same folder and renamed over
    `path` (svdtune.container.atomic_write), so an interrupted save leaves the
    old file or none, never a partial one. Its header carries svdtune's checksum,
    so later damage is detected on reading; it stays a plain safetensors file.

    Args:
        model: a CNNIQA whose state dict has exactly the reference keys.
        path: destination .safetensors file.
        metadata: optional string metadata for the header.

    Raises:
        ValueError: the model still carries adapter keys (merge it first).
        OSError: the folder is not writable, the disk is full, ...
    """
    container.atomic_write(path, container.encode(_plain_state(model), metadata or {}))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference keys of a plain CNNIQA, on the CPU; a model still carrying adapter keys is refused."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    extra = sorted(set(state) - set(EXPECTED_SHAPES))
    if extra:
        raise ValueError(f"model has non-CNNIQA keys {extra}; call svdtune.merge(model) before saving it plain")
    return state


def save_pyiqa(model: nn.Module, path: str | Path) -> None:
    """Save a plain (or merged) CNNIQA as IQA-PyTorch's {"params": state_dict} .pth, atomically.

    IQA-PyTorch loads it with
    ``pyiqa.create_metric("cnniqa", pretrained_model_path=path)`` (its CNNIQA
    reads the "params" entry with strict key matching); the example reads it back
    with `load_pretrained`. The file is a torch.save zip holding only tensors, so
    ``torch.load(path, weights_only=True)`` reads it.

    Args:
        model: a CNNIQA whose state dict has exactly the reference keys.
        path: destination .pth file.

    Raises:
        ValueError: the model still carries adapter keys (merge it first).
        OSError: the folder is not writable, the disk is full, ...
    """
    import io

    buffer = io.BytesIO()
    torch.save({"params": _plain_state(model)}, buffer)
    container.atomic_write(path, [buffer.getvalue()])
