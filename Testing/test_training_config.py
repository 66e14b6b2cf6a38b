"""Training configs: the strict loader, the shipped design configs and the design table (TensorFlow-free)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dareg.errors import DaregError
from dareg.training.config import TrainConfig, config_from_dict, load_config, merge
from dareg.training.designs import DESIGNS

from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "scripts" / "configs"
PAPER_DESIGNS = ("BL-N", "BL-NS", "SG-ND", "SG-NSD", "UW-NSD", "UW-NSDH")
MINIMAL = {"design": "BL-N", "data": {"dataset": "somewhere"}}


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_design_table_matches_the_paper():
    """Reference 3.8: which data terms each design combines, and how."""
    assert tuple(DESIGNS) == PAPER_DESIGNS
    assert {name: d.terms for name, d in DESIGNS.items()} == {
        "BL-N": ("ncc",),
        "BL-NS": ("ncc", "ssim"),
        "SG-ND": ("ncc", "dice"),
        "SG-NSD": ("ncc", "ssim", "dice"),
        "UW-NSD": ("ncc", "ssim", "dice"),
        "UW-NSDH": ("ncc", "ssim", "dice", "hd"),
    }
    assert [n for n, d in DESIGNS.items() if d.needs_labels] == ["SG-ND", "SG-NSD", "UW-NSD", "UW-NSDH"]
    assert [n for n, d in DESIGNS.items() if d.uncertainty_weighting] == ["UW-NSD", "UW-NSDH"]


@pytest.mark.parametrize("design", PAPER_DESIGNS)
def test_each_design_has_a_config_with_the_paper_settings(design):
    config = load_config(CONFIGS / f"{design}.yaml")
    assert config.design == design
    assert (config.model.preset, config.model.grid_shape) == ("paper", (128, 128, 128))
    training = config.training
    assert (training.learning_rate, training.batch_size, training.accumulation_steps) == (1e-3, 1, 8)
    assert (training.plateau_factor, training.plateau_patience) == (0.1, 10)
    assert (config.transfer.mode, config.transfer.learning_rate) == ("two-step", 1e-4)
    augmentation = config.augmentation
    assert (
        augmentation.max_deformation_mm,
        augmentation.max_rotation_deg,
        augmentation.max_translation_mm,
    ) == (
        6.0,
        10.0,
        30.0,
    )


def test_the_ci_config_is_tiny():
    config = load_config(CONFIGS / "ci.yaml")
    assert (config.model.preset, config.model.grid_shape) == ("compact", (32, 32, 32))
    assert config.training.epochs * config.training.steps_per_epoch <= 10


def test_defaults_round_trip_and_digest():
    config = config_from_dict(MINIMAL)
    assert config.training.learning_rate == 1e-3 and config.distribute.strategy == "default"
    assert config_from_dict(config.to_dict()) == config
    other = config_from_dict(merge(MINIMAL, {"training": {"learning_rate": 1e-4}}))
    assert other.digest() != config.digest()
    assert config_from_dict(config.to_dict()).digest() == config.digest()


def test_overrides_merge_section_by_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**MINIMAL, "training": {"epochs": 7, "batch_size": 2}})
    config = load_config(path, {"training": {"epochs": 3}, "data": {"dataset": tmp_path}})
    assert (config.training.epochs, config.training.batch_size) == (3, 2)
    assert config.data.dataset == str(tmp_path)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1); a float key accepts it."""
    path = tmp_path / "c.yaml"
    path.write_text("design: BL-N\ndata: {dataset: d}\ntraining: {learning_rate: 1e-4}\n", encoding="utf-8")
    assert load_config(path).training.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rte": 1e-4}, "unknown key(s) ['learning_rte']"),
        ({"training": {"learning_rte": 1e-4}}, "training has unknown key(s) ['learning_rte']"),
        ({"design": "UW-NSDX"}, "design must be one of BL-N, BL-NS, SG-ND, SG-NSD, UW-NSD, UW-NSDH"),
        ({"training": {"epochs": "many"}}, "training.epochs must be of type int"),
        ({"training": {"epochs": True}}, "training.epochs must be of type int"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate must be > 0"),
        ({"training": {"plateau_factor": 1.5}}, "plateau_factor must be in (0, 1)"),
        ({"model": {"grid_shape": [32, 32]}}, "model.grid_shape must have 3 items"),
        ({"model": {"preset": "huge"}}, "Unknown network preset 'huge'"),
        ({"model": {"grid_shape": [48, 48, 48]}}, "each a positive multiple of 64"),
        ({"losses": {"regularizer": "tv"}}, "losses.regularizer must be one of gradient_l2, bending_energy"),
        ({"augmentation": {"seed": 2}}, "validation.seed must differ from augmentation.seed"),
        ({"distribute": {"devices": ["/cpu:0"]}}, "only for strategy 'mirrored'"),
        ({"transfer": {"mode": "three-step"}}, "transfer.mode must be one of all, two-step"),
        ({"data": "folder"}, "data must be a mapping"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(tmp_path, change, message):
    path = write_yaml(tmp_path / "c.yaml", merge(MINIMAL, change))
    with pytest.raises(DaregError) as error:
        load_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_missing_required_keys_and_bad_files(tmp_path):
    with pytest.raises(DaregError, match="lacks a required key"):
        config_from_dict({"design": "BL-N"})
    with pytest.raises(DaregError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(DaregError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("design: [BL-N\n", encoding="utf-8")
    with pytest.raises(DaregError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_train_config_is_frozen():
    config = config_from_dict(MINIMAL)
    with pytest.raises(AttributeError):
        config.design = "BL-NS"
    assert isinstance(config, TrainConfig)


def test_loading_a_config_does_not_load_tensorflow():
    """So that `dareg train` rejects a bad config at once, before TensorFlow's multi-second import."""
    code = (
        "import sys\n"
        "from dareg.training.config import load_config\n"
        f"load_config({str(CONFIGS / 'UW-NSD.yaml')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == "[]"
