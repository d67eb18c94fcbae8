"""Torch datasets over in-memory (synthetic) or on-disk (AGIQA-3K) images.

Both yield (image (3, h, w) float in [0, 1], target float). Training takes a
random crop of side `crop`, flipped left-right with probability 1/2 when
`hflip`; evaluation takes the centre crop of side `eval_crop`, or the whole
image when eval_crop is 0.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from examples.cnniqa_agiqa.images import ImageCache

__all__ = ["TensorImages", "FileImages", "make_loader"]


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


def _augment(image: torch.Tensor, crop: int, train: bool, hflip: bool) -> torch.Tensor:
    """Crop (random when training, else centred), flip left-right half the time if `hflip`, scale to [0, 1]."""
    image = _crop(image, crop, train)
    if train and hflip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
    return image.float() / 255.0


class TensorImages(Dataset):
    """Images held as a uint8 tensor (N, 3, S, S) with one target each.

    Args:
        images: (N, 3, S, S) uint8.
        targets: (N,) float targets (normalized MOS).
        indices: which of the N to expose.
        crop: crop side (random when `train`, else centred); 0: whole image.
        train: random crops (True) or centre crops (False).
        hflip: when training, flip each crop left-right with probability 1/2.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: list[int], crop: int, train: bool,
                 hflip: bool = False) -> None:
        self.images, self.targets = images, targets
        self.indices, self.crop, self.train, self.hflip = list(indices), crop, train, hflip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return _augment(self.images[j], self.crop, self.train, self.hflip), self.targets[j]


class FileImages(Dataset):
    """AGIQA-3K images, taken from an ImageCache (decoded once per run, or on access beyond its budget).

    Args:
        images: the decoded images of every record (shared by every split and variant).
        targets: (N,) float targets.
        indices: which records to expose.
        crop: crop side (random when `train`, else centred); 0: whole image.
        train: random or centre crops.
        hflip: when training, flip each crop left-right with probability 1/2.
    """

    def __init__(self, images: ImageCache, targets: torch.Tensor, indices: list[int], crop: int, train: bool,
                 hflip: bool = False) -> None:
        self.images, self.targets = images, targets
        self.indices, self.crop, self.train, self.hflip = list(indices), crop, train, hflip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return _augment(self.images.get(j), self.crop, self.train, self.hflip), self.targets[j]


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
