"""Every command follows the ecosystem's conventions: `-h`, a help text for every option,
`--version` on the main commands, choices for presets and dataset names."""
from __future__ import annotations

import importlib

import click
import pytest
from click.testing import CliRunner

import segm
from segm.config import load_config

COMMANDS = {  # `python -m NAME`: its click command
    "segm.train": "segm.train.cli",
    "segm.eval.miou": "segm.eval.miou",
    "segm.inference": "segm.inference",
    "segm.bench": "segm.bench.cli",
    "segm.share": "segm.share",
    "segm.export": "segm.export.cli",
    "policynet.train": "policynet.train",
    "policynet.eval": "policynet.eval",
    "segm.scripts.prepare_ade20k": "segm.scripts.prepare_ade20k",
    "segm.scripts.prepare_pcontext": "segm.scripts.prepare_pcontext",
    "segm.scripts.prepare_cityscapes": "segm.scripts.prepare_cityscapes",
    "segm.scripts.prepare_synthetic": "segm.scripts.prepare_synthetic",
}
VERSIONED = ("segm.train", "segm.eval.miou", "segm.inference", "segm.bench", "policynet.train")


def command(name: str) -> click.Command:
    return importlib.import_module(COMMANDS[name]).main


@pytest.mark.parametrize("name", COMMANDS)
def test_dash_h_prints_usage(name):
    result = CliRunner().invoke(command(name), ["-h"], prog_name=f"python -m {name}")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: "), result.output


def test_help_option_names_are_set_in_one_place():
    """Every command takes its context settings from `segm.utils.cli`: no other file spells them."""
    from pathlib import Path

    from segm.utils.cli import CONTEXT_SETTINGS, CONTEXT_SETTINGS_WITH_DEFAULTS

    for name in COMMANDS:
        assert command(name).context_settings in (CONTEXT_SETTINGS, CONTEXT_SETTINGS_WITH_DEFAULTS), name
    repo = Path(__file__).resolve().parents[1]
    sources = [p for d in ("segm", "policynet", "scripts", "gpu") for p in (repo / d).rglob("*.py")]
    spelled = [str(p.relative_to(repo)) for p in sources if "help_option_names" in p.read_text()]
    assert spelled == ["segm/utils/cli.py"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    options = [p for p in command(name).params if isinstance(p, click.Option)]
    assert options
    missing = [p.opts[0] for p in options if not (p.help or "").strip()]
    assert not missing, f"{name}: options without help: {missing}"


@pytest.mark.parametrize("name", VERSIONED)
def test_version(name):
    result = CliRunner().invoke(command(name), ["--version"])
    assert result.exit_code == 0 and segm.__version__ in result.output, result.output


@pytest.mark.parametrize("name", ["segm.train", "segm.bench"])
def test_backbone_and_decoder_are_preset_choices(name):
    params = {p.name: p for p in command(name).params}
    presets = load_config()
    assert list(params["backbone"].type.choices) == list(presets["model"])
    assert list(params["decoder"].type.choices) == list(presets["decoder"])
    result = CliRunner().invoke(command(name), ["--backbone", "vit_huge_patch14"])
    assert result.exit_code == 2 and "'vit_huge_patch14' is not one of" in result.output


def test_dataset_names_are_choices():
    from segm.data.base import DATASET_CHOICES

    for name, param in [("segm.train", "dataset"), ("segm.eval.miou", "dataset_name"),
                        ("policynet.train", "dataset"), ("policynet.eval", "dataset")]:
        p = {p.name: p for p in command(name).params}[param]
        assert set(p.type.choices) == set(DATASET_CHOICES), name


def test_bench_device_defaults_to_auto():
    device = {p.name: p for p in command("segm.bench").params}["device"]
    assert device.default == "auto"
