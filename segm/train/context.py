"""What a training run holds fixed while it trains. `RunContext` is what the shared machinery
(checkpoint writing in `segm.train.state`, logging) needs of any trainer's run: this process's
place among the processes, the run folder, the checkpoint file, the TensorBoard writer. `Run`
is segm.train's, with its options, data and variant; policynet's extends `RunContext` too.
The state and the loops take these as arguments, and this module imports neither."""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segm.utils.distributed import DistInfo
from segm.utils.logger import append_log

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from segm.train.data import TrainData
    from segm.train.options import TrainOptions

LOG_FILE = "log.txt"


@dataclass
class RunContext:
    """A run's process (`dist`), folder, checkpoint file (the one resuming reads) and, on rank
    0 once opened, its TensorBoard writer."""

    dist: DistInfo
    log_dir: Path
    ckpt_path: Path
    _: KW_ONLY
    writer: SummaryWriter | None = None

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def open_writer(self, resumed_at: int | None) -> None:
        """TensorBoard events in the run folder. Resuming from the checkpoint of iteration
        `resumed_at`, the events a stopped run wrote after it are dropped; its own step is kept."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resumed_at is None else resumed_at + 1)

    def close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def log_line(self, record: dict) -> None:
        """Appends one JSON line to the run's log.txt (written through and synced)."""
        append_log(self.log_dir / LOG_FILE, record)


@dataclass
class Run(RunContext):
    """segm.train's run: its options, the data and the variant it records."""

    opts: TrainOptions
    data: TrainData
    variant: dict
