"""`dareg register --model PATH`: the network path, checksum refusal, and warnings from a bad network."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dareg.cli import main
from dareg.geometry import normalisation_config
from dareg.models import ModelConfig, build_registration_network, save_model

from cli_helpers import folder_listing, write_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"), seed=5)


def save_compact(folder, *, flow_scale: float | None = None):
    network = build_registration_network("compact", (32, 32, 32))
    if flow_scale is not None:  # a deliberately broken network: large random flow
        flow_layer = network.get_layer("flow")
        kernel, bias = flow_layer.get_weights()
        rng = np.random.default_rng(0)
        flow_layer.set_weights([rng.normal(0, flow_scale, kernel.shape).astype(np.float32), bias])
    config = ModelConfig(
        preset="compact",
        grid_shape=(32, 32, 32),
        normalisation=normalisation_config(),
        design="test-untrained",
    )
    return save_model(network, folder, config)


def model_args(case, out, model, optimize="0"):
    args = case.args(out)
    args[args.index("--model") + 1] = str(model)
    args[args.index("--optimize") + 1] = optimize
    return args


def test_untrained_model_runs_through_the_pipeline(case, tmp_path):
    model = save_compact(tmp_path / "model")
    out = tmp_path / "out"
    assert main(model_args(case, out, model)) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["model"] == "test-untrained"
    assert "network" in document["timings_s"]
    # an untrained network predicts ~zero flow: the result is the rigid initialisation
    initial, registered = document["metrics"]["initial"], document["metrics"]["registered"]
    assert registered["labels"]["liver"]["dice"] == pytest.approx(
        initial["labels"]["liver"]["dice"], abs=0.01
    )


def test_corrupted_model_is_refused(case, tmp_path, capsys):
    model = save_compact(tmp_path / "model")
    weights = model / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(model_args(case, out, model)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "corrupt" in err.lower()
    assert folder_listing(out) == []


def test_a_network_that_makes_things_worse_is_reported(case, tmp_path, capsys):
    model = save_compact(tmp_path / "bad_model", flow_scale=0.5)
    out = tmp_path / "out"
    assert main(model_args(case, out, model)) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["metrics"]["registered"]["jacobian"]["fraction_nonpositive"] > 0
    assert any("folds" in w for w in document["warnings"])
    assert any("dropped" in w for w in document["warnings"])
    assert "WARNING:" in capsys.readouterr().out
