"""The pieces of segm.train that the policy trainer runs on too: the one masked cross-entropy,
the loss guard, the checkpoint protocol, the run context; and the layering of both trainers."""
import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from policynet.metrics import policy_loss
from segm.train.context import RunContext
from segm.train.loss import NonFiniteLossError, check_loss, segmentation_loss
from segm.train.process import single_process
from segm.train.run_dir import remove_torn_writes
from segm.train.state import CheckpointedState
from segm.utils.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parent.parent


def _batch(seed, n_cls=2, shape=(3, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], n_cls, *shape[1:], generator=g)
    labels = torch.randint(0, n_cls, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = 255
    return logits, labels


def _value_and_grad(fn, logits, labels):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels)
    loss.backward()
    return loss.detach(), x.grad


def _old_policy_loss(logits, labels):
    """policynet's own loss before it used segm.train's."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=255, reduction="sum")
    return total / (labels != 255).sum().clamp(min=1)


def _old_segmentation_loss(logits, labels):
    """segm.train's loss on one process before it served both trainers."""
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=255, reduction="sum")
    denom = (labels != 255).sum().to(loss_sum.dtype).clamp(min=1)
    return loss_sum * (1 / denom)


@pytest.mark.parametrize("seed", range(5))
def test_shared_loss_gives_policynets_old_values_and_gradients_exactly(seed):
    logits, labels = _batch(seed)
    want, want_grad = _value_and_grad(_old_policy_loss, logits, labels)
    got, got_grad = _value_and_grad(policy_loss, logits, labels)
    shared, _ = _value_and_grad(lambda x, y: segmentation_loss(x, y)[0], logits, labels)
    assert torch.equal(got, want) and torch.equal(shared, want)
    assert torch.equal(got_grad, want_grad)
    assert segmentation_loss(logits, labels)[1].item() == want.item()  # the logged value too
    nothing = torch.full_like(labels, 255)
    assert policy_loss(logits, nothing).item() == 0.0 == _old_policy_loss(logits, nothing).item()


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_updates_are_unchanged_on_one_process(seed):
    """The quotient form serves the policy's logged loss; the gradient the segmenter's update
    follows is the one of the former `loss_sum * (1 / count)`, bit for bit."""
    logits, labels = _batch(seed, n_cls=6, shape=(2, 9, 11))
    _, want = _value_and_grad(_old_segmentation_loss, logits, labels)
    _, got = _value_and_grad(lambda x, y: segmentation_loss(x, y)[0], logits, labels)
    assert torch.equal(got, want)


def test_check_loss_stops_on_nan_inf_and_exploded_values():
    check_loss(0.7, 2, "at iteration 1", "then")
    check_loss(100 * 0.69, 2, "at iteration 1", "then")  # just below 100·ln 2
    with pytest.raises(NonFiniteLossError, match=r"^the loss is nan at iteration 3; stopped\. note$"):
        check_loss(float("nan"), 10, "at iteration 3", "stopped. note")
    with pytest.raises(NonFiniteLossError, match="the loss is inf between"):
        check_loss(float("inf"), 10, "between iterations 1 and 2", "x")
    with pytest.raises(NonFiniteLossError, match=r"the loss is 70 at it \(exploded: above 100·ln K = 69; lower"):
        check_loss(70.0, 2, "at it", "x")


class _State(CheckpointedState):
    pass


def _state_and_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = _State(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run = RunContext(single_process(torch.device("cpu")), tmp_path, tmp_path / "state.pth")
    return state, run


def test_write_checkpoint_hands_the_rng_state_to_the_writer(tmp_path):
    state, run = _state_and_run(tmp_path)
    state.iteration = 4
    written = []
    state.write_checkpoint(run, written.append)
    assert len(written) == 1 and len(written[0]) == 1  # one process, one RNG state
    assert torch.equal(written[0][0]["torch"], torch.get_rng_state())
    assert state.last_saved == 4
    note = state.last_checkpoint_note(run)
    assert note == f"The last good checkpoint is {tmp_path / 'state.pth'} (iteration 4), intact"


def test_write_checkpoint_refuses_broken_weights_and_reports_failed_writes(tmp_path):
    state, run = _state_and_run(tmp_path)
    assert state.last_checkpoint_note(run).startswith("No checkpoint was written yet")

    def failing(rngs):
        raise CheckpointError("cannot write state.pth: disk full")

    state.iteration = 2
    with pytest.raises(CheckpointError, match="disk full; training stopped at iteration 2. No checkpoint"):
        state.write_checkpoint(run, failing)
    assert state.last_saved is None
    with torch.no_grad():
        state.model.weight[0, 0] = float("nan")
    written = []
    with pytest.raises(NonFiniteLossError, match="weight.*at iteration 2; training stopped"):
        state.write_checkpoint(run, written.append)
    assert written == [] and state.last_saved is None


def test_run_context_logs_json_lines_and_drops_events_after_the_checkpoint(tmp_path):
    _, run = _state_and_run(tmp_path)
    run.log_line({"iteration": 1, "loss": 0.5})
    run.log_line({"iteration": 2})
    assert [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()] == [
        {"iteration": 1, "loss": 0.5}, {"iteration": 2}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for resumed_at, steps in ((None, range(1, 9)), (5, [6])):  # a run stopped at 8, resumed from 5
        run.open_writer(resumed_at)
        for step in steps:
            run.writer.add_scalar("loss", float(step), step)
        run.close_writer()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_remove_torn_writes_of_the_named_files(tmp_path):
    torn = [tmp_path / ".model.pth.abc.tmp", tmp_path / ".state.pth.x1.tmp"]
    kept = [tmp_path / ".other.pth.abc.tmp", tmp_path / "model.pth"]
    for path in torn + kept:
        path.write_text("")
    remove_torn_writes(tmp_path, ("model.pth", "state.pth"))
    assert not any(p.exists() for p in torn) and all(p.exists() for p in kept)


def _module_imports(packages):
    """Every import between the modules of `packages`, wherever it stands (function bodies and
    `if TYPE_CHECKING:` blocks included), as {module: {imported modules}}."""
    files = {}
    for package in packages:
        for path in (REPO / package.replace(".", "/")).glob("*.py"):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    graph = {}
    for name, path in files.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in files and t != name}
        graph[name] = found
    return graph


def _cycles(graph):
    cycles, status = [], {}

    def visit(node, path):
        status[node] = "open"
        for nxt in sorted(graph[node]):
            if status.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [node, nxt])
            elif nxt not in status:
                visit(nxt, path + [node])
        status[node] = "done"

    for node in sorted(graph):
        if node not in status:
            visit(node, [])
    return cycles


def test_no_import_cycles_in_the_training_stacks():
    graph = _module_imports(["segm.train", "policynet"])
    assert "segm.train.context" in graph and "policynet.run" in graph
    assert not graph["segm.train.context"] & {"segm.train.state", "segm.train.loop", "segm.train.run"}
    assert _cycles(graph) == []
