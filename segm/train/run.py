"""`train(options)`: the phases of a run, in order. Everything is checked and built before the
log folder is touched; the random draws happen in a fixed order (weights seeded by --seed on
every rank, then dropout and drop path by --seed + rank), so a run is reproducible and a
resumed one continues exactly (docs/DESIGN.md, "Determinism and resuming")."""
from __future__ import annotations

import json

from pathlib import Path

import torch

from segm.config import dump_yaml
from segm.train.context import Run
from segm.train.data import build_data, dataset_classes
from segm.train.loop import finish_epoch, train_one_epoch
from segm.train.model import create_train_state, model_description
from segm.train.options import TrainOptions, resolve_options, user_errors
from segm.train.process import distribute, start_process
from segm.train.run_dir import CHECKPOINT, agree_on_plan, lock_and_open
from segm.train.state import TrainState
from segm.train.variant import build_variant
from segm.utils.determinism import seed_everything
from segm.utils.distributed import cleanup, dist_env_from_environ
from segm.utils.logger import restore_log


def train(options) -> dict:
    """Runs (or resumes) a training run; returns the last log record. `options`: a
    TrainOptions, or `main`'s parameters as a mapping or a namespace."""
    with user_errors():
        opts = resolve_options(options, dist_env_from_environ().world_size)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    run = lock = None
    try:
        run, resume_from, diffs = plan_run(opts)
        state = create_train_state(opts, run.variant["net_kwargs"], run.device, run.data.total_iters,
                                   fresh=resume_from is None)
        lock = lock_and_open(run.log_dir, run.variant, opts.resume, opts.overwrite, (resume_from, diffs), run.dist)
        seed_everything(opts.seed + run.dist.rank)  # dropout / drop path differ between ranks
        print(f"{opts.num_workers} data-loading workers and {torch.get_num_threads()} intra-op threads per process "
              "(--num-workers, --threads)")
        if resume_from is not None:
            state.restore(run, resume_from)
        run.variant["algorithm_kwargs"]["start_epoch"] = state.next_epoch
        if state.iteration >= run.data.total_iters:
            return already_complete(run, state)
        return train_epochs(run, state, resumed=resume_from is not None)
    finally:
        if run is not None:
            run.close_writer()
        if lock is not None:
            lock.release()
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup()


def plan_run(opts: TrainOptions) -> tuple[Run, Path | None, list[str]]:
    """This process, the data, the model description and the log-folder plan (fresh start or
    resume, decided on rank 0); nothing is written yet. Returns the run, the checkpoint to
    resume from (or None) and the configuration differences to report."""
    info = start_process(opts)
    classes = dataset_classes(opts)
    net_kwargs = model_description(opts, classes.n_cls)
    data = build_data(opts, info, classes)
    variant = build_variant(opts, net_kwargs, info.world_size, data.total_iters, data.num_epochs)
    resume_from, diffs = agree_on_plan(opts.log_dir, variant, opts.resume, opts.overwrite, info)
    run = Run(info, opts.log_dir, opts.log_dir / CHECKPOINT, opts=opts, data=data, variant=variant)
    return run, resume_from, diffs


def already_complete(run: Run, state: TrainState) -> dict:
    if run.is_main:
        restore_log(run.log_dir / "log.txt", before_epoch=run.data.num_epochs, pending=state.log_record)
        print(f"training already complete ({state.iteration} of {run.data.total_iters} iterations) in {run.log_dir}")
    return state.log_record or {}


def train_epochs(run: Run, state: TrainState, *, resumed: bool) -> dict:
    """Records the settings, then trains epoch after epoch to the end of the iteration budget."""
    if run.is_main:
        dump_yaml(run.variant, run.log_dir / "variant.yml")
        restore_log(run.log_dir / "log.txt", before_epoch=state.next_epoch, pending=state.log_record)
    net = distribute(state.model, run.dist)
    if run.is_main:
        run.open_writer(state.iteration if resumed else None)
        # what the run reduces, beside its curves (TensorBoard's text tab)
        run.writer.add_text("model/reduction", json.dumps(state.model.describe_reduction()), state.iteration)
        print_summary(run, state.model)
    while state.next_epoch < run.data.num_epochs and state.iteration < run.data.total_iters:
        epoch = state.next_epoch
        end_batch = train_one_epoch(net, state, run)
        finish_epoch(net, state, run, epoch, end_batch)
    if run.is_main:
        print(f"training done: {state.iteration} iterations; checkpoint {run.ckpt_path}")
    return state.log_record


def print_summary(run: Run, model: torch.nn.Module) -> None:
    opts, data = run.opts, run.data
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{opts.dataset}: {len(data.train_set)} train / {len(data.val_set)} val images, {data.n_cls} classes; "
          f"{opts.backbone} + {opts.decoder}, {n_params / 1e6:.2f} M trainable parameters, "
          f"{model.reducer.summary()}; "
          f"{run.world_size} process(es) on {run.device.type}, batch {opts.batch_size} "
          f"({data.local_batch} per process), {data.iters_per_epoch} iterations/epoch, "
          f"{data.total_iters} iterations")
