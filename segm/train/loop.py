"""The training loop: one epoch of steps, the evaluation, and the end of an epoch
(checkpoint, log line). Everything that changes lives in the `TrainState`. `apply_update` and
`make_progress` serve the policy trainer's iteration loop too."""
from __future__ import annotations

import sys
import time

import torch

from segm.train.context import Run
from segm.train.loss import check_loss, segmentation_loss
from segm.train.state import TrainState, fresh_meters
from segm.utils.amp import autocast

EVAL_WINDOW_BATCH = 4
VAL_SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iou")


def train_one_epoch(net: torch.nn.Module, state: TrainState, run: Run) -> int:
    """Trains epoch `state.next_epoch` from batch `state.next_batch` to the end of the epoch or
    of the iteration budget, checkpointing every --ckpt-every iterations. `net` is the model
    the steps call (DDP-wrapped on several processes). Returns the end batch."""
    opts, data = run.opts, run.data
    epoch, start_batch = state.next_epoch, state.next_batch
    if start_batch == 0:  # else: the meters of the interrupted epoch, from the checkpoint
        state.meters = fresh_meters()
    end_batch = min(data.iters_per_epoch, start_batch + data.total_iters - state.iteration)
    data.sampler.set_epoch(epoch, start_batch * data.local_batch)
    net.train()
    bar = make_progress(end_batch, start_batch, f"epoch {epoch}/{data.num_epochs - 1}", run.is_main)
    t_last, smooth_loss, speed = time.perf_counter(), None, None
    for batch_idx, batch in enumerate(data.train_loader, start=start_batch):
        loss_value, lr = train_step(net, state, run, batch, epoch)

        now = time.perf_counter()
        rate = opts.batch_size / max(now - t_last, 1e-9)
        t_last = now
        smooth_loss = loss_value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss_value
        speed = rate if speed is None else 0.9 * speed + 0.1 * rate
        bar.set_postfix(loss=f"{smooth_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}", refresh=False)
        bar.update(1)
        if run.writer is not None:
            run.writer.add_scalar("train/loss", loss_value, state.iteration)
            run.writer.add_scalar("train/learning_rate", lr, state.iteration)

        if batch_idx + 1 == end_batch:
            break
        if opts.ckpt_every and state.iteration % opts.ckpt_every == 0:
            state.save(run, epoch, batch_idx + 1)
    bar.close()
    return end_batch


def train_step(net: torch.nn.Module, state: TrainState, run: Run, batch: dict, epoch: int) -> tuple[float, float]:
    """One update; returns (global mean loss, learning rate after the schedule's step)."""
    im = batch["im"].to(run.device, non_blocking=True)
    seg = batch["segmentation"].to(run.device, non_blocking=True)
    with autocast(run.device.type, run.opts.autocast_dtype):
        logits = net(im, seg) if state.model.needs_labels else net(im)
    loss, loss_global = segmentation_loss(logits, seg, run.world_size)
    loss_value = loss_global.item()
    check_loss(loss_value, run.data.n_cls, f"at iteration {state.iteration + 1} (epoch {epoch})",
               "training stopped before this update. " + state.last_checkpoint_note(run))
    apply_update(state.optimizer, loss, state.scaler)
    state.iteration += 1
    state.scheduler.step_update(state.iteration)
    lr = state.optimizer.param_groups[0]["lr"]  # as the reference: the lr after step_update
    state.meters["loss_sum"] += loss_value
    state.meters["lr_sum"] += lr
    state.meters["count"] += 1
    return loss_value, lr


def apply_update(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimiser update from `loss` (through the AMP loss scaler when there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def evaluate(net: torch.nn.Module, run: Run) -> tuple[dict, list]:
    """Single-scale sliding-window scores on the val set, as `val_*` log entries, and the
    per-class IoU (for TensorBoard)."""
    from segm.eval.evaluate import evaluate_dataset

    opts = run.opts
    scores = evaluate_dataset(
        net, run.data.val_loader, n_cls=run.data.n_cls, window_size=opts.window_size,
        window_stride=opts.window_stride, window_batch_size=EVAL_WINDOW_BATCH, device=run.device,
        amp_dtype=opts.autocast_dtype, progress=run.is_main,
    )
    return {f"val_{key}": scores[key] for key in VAL_SCORES}, scores["cat_iou"]


def finish_epoch(net: torch.nn.Module, state: TrainState, run: Run, epoch: int, end_batch: int) -> None:
    """The end of an epoch (or of the run): evaluate when due, checkpoint, write the log line.
    An evaluation first checkpoints the epoch without its scores, so bad validation data or a
    crash while evaluating never loses the epoch's training; the checkpoint is then rewritten
    with the scores, as it would be without that first save."""
    meters = state.meters
    train = {"train_loss": meters["loss_sum"] / meters["count"],
             "train_learning_rate": meters["lr_sum"] / meters["count"]}
    position = (epoch + 1, 0) if end_batch == run.data.iters_per_epoch else (epoch, end_batch)
    scores, cat_iou = {}, None
    last = state.iteration >= run.data.total_iters
    if (last and run.opts.final_eval) or (run.opts.eval_freq and epoch % run.opts.eval_freq == 0):
        state.log_record = {**train, "epoch": epoch, "num_updates": state.iteration}
        state.save(run, *position)
        scores, cat_iou = evaluate(net, run)
    record = {**train, **scores, "epoch": epoch, "num_updates": state.iteration}
    state.log_record = record
    state.save(run, *position)
    if run.is_main:
        log_epoch(run, record, state.iteration, cat_iou)


def log_epoch(run: Run, record: dict, iteration: int, cat_iou: list | None = None) -> None:
    run.log_line(record)
    for key, value in record.items():
        if key.startswith("val_"):
            run.writer.add_scalar(f"val/{key[4:]}", value, iteration)
    for name, iou in zip(run.data.class_names, cat_iou or ()):
        if iou == iou:  # NaN: the class is absent from labels and predictions
            run.writer.add_scalar(f"val_iou/{name}", iou, iteration)
    run.writer.flush()
    print(f"epoch {record['epoch']}: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"
    ))


def make_progress(total, initial, desc, enabled):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, leave=interactive)
