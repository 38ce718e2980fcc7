"""The data of a run: the dataset's classes, the train and val loaders, and the iteration
plan they imply (iterations per epoch, total iterations, epochs)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from segm.config import dataset_dir
from segm.train.options import TrainOptions, user_errors
from segm.utils.determinism import ResumableSampler, SeededDataset
from segm.utils.distributed import DistInfo


@dataclass(frozen=True)
class TrainData:
    n_cls: int
    class_names: tuple
    train_set: SeededDataset
    val_set: Dataset
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader
    local_batch: int  # this process's share of --batch-size
    iters_per_epoch: int
    total_iters: int
    num_epochs: int


def dataset_classes(opts: TrainOptions):
    """The dataset's `DatasetInfo` (classes; raises ConfigError when it cannot be found)."""
    from segm.data import dataset_info

    with user_errors():
        if opts.data_root is None:
            dataset_dir()  # $DATASET unset: a usage error before anything is built
        return dataset_info(opts.dataset, data_root=opts.data_root, classes_file=opts.classes)


def build_data(opts: TrainOptions, dist: DistInfo, classes) -> TrainData:
    """The loaders and the iteration plan; `classes`: the dataset's `DatasetInfo`."""
    from segm.data import build_dataset, val_collate

    with user_errors():
        data_kw = dict(im_size=opts.im_size, crop_size=opts.crop_size, normalization=opts.normalization,
                       data_root=opts.data_root, classes_file=opts.classes)
        train_set = SeededDataset(build_dataset(opts.dataset, "train", **data_kw), opts.seed)
        val_set = build_dataset(opts.dataset, "val", **data_kw)
        local_batch = opts.batch_size // dist.world_size
        sampler = ResumableSampler(len(train_set), num_replicas=dist.world_size, rank=dist.rank, seed=opts.seed)
        iters_per_epoch = math.ceil(sampler.per_rank / local_batch)
        total_iters = opts.iterations or opts.epochs * iters_per_epoch
        loader_kw = dict(num_workers=opts.num_workers, pin_memory=dist.device.type == "cuda")
        train_loader = DataLoader(
            train_set, batch_size=local_batch, sampler=sampler, drop_last=False,
            persistent_workers=opts.num_workers > 0,
            # A private generator: creating an iterator must not draw from the global RNG.
            generator=torch.Generator().manual_seed(opts.seed), **loader_kw,
        )
        val_sampler = DistributedSampler(val_set, shuffle=False) if dist.distributed else None
        val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, collate_fn=val_collate, **loader_kw)
    return TrainData(classes.n_cls, tuple(classes.class_names), train_set, val_set, sampler, train_loader, val_loader, local_batch, iters_per_epoch,
                     total_iters, math.ceil(total_iters / iters_per_epoch))
