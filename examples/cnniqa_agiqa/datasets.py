"""Torch datasets over in-memory (synthetic) or on-disk (AGIQA-3K) images.

Both yield (image (3, h, w) float in [0, 1], target float). Training takes a
random crop of side `crop`; evaluation takes the centre crop of side
`eval_crop`, or the whole image when eval_crop is 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["TensorImages", "FileImages", "make_loader", "resized_size"]


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `resize` px (0 keeps the size), as FileImages does."""
    if not resize:
        return width, height
    scale = resize / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _crop(image: torch.Tensor, side: int, random: bool) -> torch.Tensor:
    """Crop (3, H, W) to (3, side, side), randomly or centred; side 0 keeps it."""
    if side <= 0:
        return image
    _, h, w = image.shape
    if h < side or w < side:
        raise ValueError(f"image of {h}x{w} px is smaller than the crop {side}; lower --crop/--eval-crop or raise --resize")
    if random:
        top = int(torch.randint(0, h - side + 1, (1,)))
        left = int(torch.randint(0, w - side + 1, (1,)))
    else:
        top, left = (h - side) // 2, (w - side) // 2
    return image[:, top : top + side, left : left + side]


class TensorImages(Dataset):
    """Images held as a uint8 tensor (N, 3, S, S) with one target each.

    Args:
        images: (N, 3, S, S) uint8.
        targets: (N,) float targets (normalized MOS).
        indices: which of the N to expose.
        crop: crop side (random when `train`, else centred); 0: whole image.
        train: random crops (True) or centre crops (False).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: list[int], crop: int, train: bool) -> None:
        self.images, self.targets = images, targets
        self.indices, self.crop, self.train = list(indices), crop, train

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        image = _crop(self.images[j], self.crop, self.train).float() / 255.0
        return image, self.targets[j]


class FileImages(Dataset):
    """Images decoded from files on every access (AGIQA-3K).

    Args:
        root: image folder.
        names: file names, one per record.
        targets: (N,) float targets.
        indices: which records to expose.
        crop: crop side (random when `train`, else centred); 0: whole image.
        train: random or centre crops.
        resize: shorter side after resizing (bicubic); 0 keeps the original.
    """

    def __init__(self, root: str | Path, names: list[str], targets: torch.Tensor, indices: list[int],
                 crop: int, train: bool, resize: int = 0) -> None:
        self.root, self.names, self.targets = Path(root), names, targets
        self.indices, self.crop, self.train, self.resize = list(indices), crop, train, resize

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, name: str) -> torch.Tensor:
        """Decode one file to (3, H, W) uint8, resized if asked."""
        import numpy as np
        from PIL import Image

        with Image.open(self.root / name) as image:
            image = image.convert("RGB")
            if self.resize:
                image = image.resize(resized_size(image.width, image.height, self.resize), Image.BICUBIC)
            array = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        image = _crop(self._read(self.names[j]), self.crop, self.train).float() / 255.0
        return image, self.targets[j]


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, workers: int = 0,
                distributed: bool = False) -> DataLoader:
    """A DataLoader: shuffled (per-rank shard under DDP) for training, in order otherwise.

    Evaluation of whole images of unequal size (FileImages with crop 0) uses
    batches of one image.

    Args:
        dataset: a TensorImages or FileImages.
        batch_size: images per batch (per process under DDP).
        train: shuffle and drop nothing; evaluation keeps the order.
        seed: shuffling seed.
        workers: DataLoader worker processes.
        distributed: shard the training set over the process group.

    Returns:
        The loader; under DDP its sampler needs set_epoch(epoch) every epoch.
    """
    if not train and isinstance(dataset, FileImages) and dataset.crop == 0:
        batch_size = 1
    sampler = None
    generator = torch.Generator().manual_seed(seed)
    if distributed and train:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, generator=generator, persistent_workers=False)
