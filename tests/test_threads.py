"""Workers and intra-op threads planned together (segm.utils.threads), and the trainers' use of them."""
import pytest
from click.testing import CliRunner

from segm.utils.threads import SMALL_MACHINE, cores_per_process, plan_cpu


@pytest.mark.parametrize("cores, workers, threads", [(1, 0, 1), (2, 0, 2), (SMALL_MACHINE, 0, SMALL_MACHINE),
                                                     (8, 2, 6), (16, 4, 12), (64, 10, 54)])
def test_cpu_runs_never_oversubscribe(cores, workers, threads):
    plan = plan_cpu("cpu", 10, env={}, cores=cores)
    assert (plan.workers, plan.threads) == (workers, threads)
    assert plan.workers + plan.threads <= max(cores, 1)


def test_gpu_runs_keep_a_core_and_torch_threads():
    assert (plan_cpu("cuda", 10, env={}, cores=2).workers, plan_cpu("cuda", 10, env={}, cores=2).threads) == (1, None)
    assert plan_cpu("cuda", 10, env={}, cores=32).workers == 10
    assert plan_cpu("cuda", 8, env={}, cores=1).workers == 0


def test_given_values_and_omp_num_threads_win():
    assert plan_cpu("cpu", 10, workers=3, threads=1, env={}, cores=2) .workers == 3
    assert plan_cpu("cpu", 10, workers=3, env={}, cores=8).threads == 5
    assert plan_cpu("cpu", 10, env={"OMP_NUM_THREADS": "4"}, cores=2).threads is None
    with pytest.raises(ValueError, match="--threads must be ≥ 1"):
        plan_cpu("cpu", 10, threads=0, env={}, cores=2)
    with pytest.raises(ValueError, match="--num-workers must be ≥ 0"):
        plan_cpu("cpu", 10, workers=-1, env={}, cores=2)


def test_cores_are_shared_by_the_node_processes():
    mine = cores_per_process({})
    assert mine >= 1
    assert cores_per_process({"LOCAL_WORLD_SIZE": "2"}) == max(1, mine // 2)
    assert cores_per_process({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == max(1, mine // 2)
    assert cores_per_process({"LOCAL_WORLD_SIZE": "1000"}) == 1
    # srun binds each task to its --cpus-per-task cores: no second division
    assert cores_per_process({"SLURM_CPUS_PER_TASK": "1", "SLURM_NTASKS_PER_NODE": "4"}) == 1
    assert cores_per_process({"SLURM_CPUS_PER_TASK": "4096"}) == mine


def test_train_options_resolve_the_plan(synthetic_root, tmp_path, monkeypatch):
    from segm.train.options import ConfigError, resolve_options
    from tests.helpers.train import tiny_args

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from segm.train.cli import main

    ctx = main.make_context("segm.train", tiny_args(tmp_path / "run", synthetic_root, "--device", "cpu"))
    opts = resolve_options(dict(ctx.params, num_workers=None), 1)
    expected = plan_cpu("cpu", 10)
    assert (opts.num_workers, opts.threads) == (expected.workers, expected.threads)
    with pytest.raises(ConfigError, match="--threads must be ≥ 1"):
        resolve_options(dict(ctx.params, threads=0), 1)


@pytest.mark.parametrize("module", ["segm.train", "policynet.train"])
def test_help_states_the_defaults(module):
    import importlib

    main = importlib.import_module(module).main
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "--threads" in out and f"0 with ≤ {SMALL_MACHINE} cores per process" in out
