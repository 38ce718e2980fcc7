"""One path from the command line to the model: `segm.model.spec.check_net_kwargs` is where
`segm.train`'s model options are validated; each bad option fails there, with one line."""
import pytest

from segm.model import spec
from tests.helpers.train import make_policy_ckpt, run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def raised_in_spec(monkeypatch):
    """Records the errors that `check_net_kwargs` raises."""
    raised = []
    real = spec.check_net_kwargs

    def spy(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except ValueError as e:
            raised.append(str(e))
            raise

    monkeypatch.setattr(spec, "check_net_kwargs", spy)
    return raised


def _tf_policy(tmp_path):
    ckpt = tmp_path / "policy" / "model.pth"
    ckpt.parent.mkdir()
    make_policy_ckpt(ckpt)
    (ckpt.parent / "config.json").write_text('{"backbone": "tf_efficientnet_lite0"}')
    return ckpt


@pytest.mark.parametrize("case, fragment", [
    ("budget", "out of range"),
    ("crop", "multiple of 32"),
    ("policy backbone", "trained with backbone 'tf_efficientnet_lite0'"),
])
def test_bad_model_options_are_caught_in_check_net_kwargs(synthetic_root, tmp_path, raised_in_spec, case, fragment):
    extra = {
        "budget": ["--policy-method", "random", "--num-tokens-shared", "5"],
        "crop": ["--policy-method", "random", "--num-tokens-shared", "1", "--crop-size", "80", "--im-size", "80"],
        "policy backbone": ["--policy-method", "policy_net", "--num-tokens-shared", "1",
                            "--policynet-ckpt", str(_tf_policy(tmp_path)), "--policy-backbone", "efficientnet_lite0"],
    }[case]
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, synthetic_root, *extra))
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert len(raised_in_spec) == 1 and raised_in_spec[0] in lines[0]
    assert not log_dir.exists()


def test_the_recorded_description_is_what_gets_built(synthetic_root, tmp_path):
    """variant.yml records exactly what build_net_kwargs returned, and create_segmenter builds it."""
    import segm
    from segm.config import load_yaml

    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, synthetic_root, "--policy-method", "random", "--num-tokens-shared", "2",
                               "--iterations", "1", "--batch-size", "2", "--eval-freq", "0"))
    assert result.exit_code == 0, result.output
    net = load_yaml(log_dir / "variant.yml")["net_kwargs"]
    assert net["policy_schedule"] == (8, 2)
    built = spec.check_net_kwargs(net)
    assert (built.num_notshared, built.num_shared, built.crop) == (8, 2, (64, 64))
    model, _ = segm.load_model(log_dir / "checkpoint.pth")
    assert model.reducer.num_shared == 2 and model.crop_size == (64, 64)
