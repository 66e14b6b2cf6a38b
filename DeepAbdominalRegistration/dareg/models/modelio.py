"""Model files: a model is a FOLDER holding ``config.json``, ``model.weights.h5`` and ``manifest.json``.

- ``config.json``: a :class:`ModelConfig` (pure data: preset name, grid, normalisation, facts).
- ``model.weights.h5``: Keras 3 ``save_weights`` of the network built from that config.
- ``manifest.json``: SHA-256 of both, verified before either is read.

Loading never deserialises code (no ``keras.models.load_model``, no pickle, no Lambda layers): the
architecture is rebuilt from the config by :func:`build_registration_network` and only the weight
arrays are read, so a model file cannot run anything. Saving is atomic: everything is written into a
temporary folder beside the target, which is then renamed into place, so a failure never leaves a
half-written model where a reader would find it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from ..errors import DaregError
from .config import CONFIG_FILE, ModelConfig, read_config
from .manifest import verify_manifest, write_manifest
from .unet import build_registration_network

WEIGHTS_FILE = "model.weights.h5"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True)
class LoadedModel:
    """A network with the config it was built from (normalisation, grid and provenance)."""

    network: keras.Model
    config: ModelConfig


def build_from_config(config: ModelConfig) -> keras.Model:
    """A freshly initialised network with the architecture ``config`` describes."""
    return build_registration_network(
        config.preset, config.grid_shape, integration_steps=config.integration_steps
    )


def _architecture_signature(network: keras.Model) -> list:
    """Per layer: class, settings and weight shapes, ignoring what training may legitimately change.

    Weight shapes alone would not do: the network is fully convolutional, so the same weights fit
    any grid and any number of integration steps, which only the layer configs record.
    """
    signature = []
    for layer in network.layers:
        settings = {k: v for k, v in layer.get_config().items() if k not in ("trainable", "dtype")}
        signature.append((type(layer).__name__, settings, [tuple(w.shape) for w in layer.weights]))
    return signature


def _check_architecture(network: keras.Model, config: ModelConfig) -> None:
    """DaregError unless ``network`` is exactly the architecture ``config`` describes.

    Checked at save time because a model whose config does not describe it could be saved but
    would then load as a different network, or not at all.
    """
    if _architecture_signature(network) != _architecture_signature(build_from_config(config)):
        raise DaregError(
            f"The network does not match its config (preset {config.preset!r}, grid {config.grid_shape}, "
            f"integration_steps {config.integration_steps}): build it with build_registration_network from "
            "the same values."
        )


def _write_folder(network: keras.Model, folder: Path, config: ModelConfig) -> None:
    (folder / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    network.save_weights(str(folder / WEIGHTS_FILE))
    write_manifest(folder, list(MODEL_FILES))


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``; an existing ``folder`` is restored if the swap fails."""
    if not folder.exists():
        staging.replace(folder)
        return
    retired_root = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    retired = retired_root / folder.name
    folder.replace(retired)
    try:
        staging.replace(folder)
    except BaseException:
        retired.replace(folder)
        retired_root.rmdir()
        raise
    shutil.rmtree(retired_root, ignore_errors=True)


def save_model(
    network: keras.Model, folder: str | Path, config: ModelConfig, *, overwrite: bool = False
) -> Path:
    """Save ``network`` and ``config`` as a model folder, atomically.

    Parameters
    ----------
    network : built by ``build_registration_network(config.preset, config.grid_shape, ...)``.
    folder : the model folder to create (its parent is created if needed).
    config : what the model is; must describe ``network``'s architecture.
    overwrite : replace an existing folder (the old one is removed only once the new one is complete).

    Returns
    -------
    The model folder path.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise DaregError(
            f"Model folder {folder} already exists; choose another folder or pass overwrite=True."
        )
    _check_architecture(network, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        _write_folder(network, staging, config)
        _move_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_model(folder: str | Path) -> LoadedModel:
    """Load a model folder: verify checksums, rebuild the architecture from the config, load the weights.

    Raises
    ------
    DaregError
        The folder is missing, a file is missing or does not match the manifest (corrupted or
        tampered), the config is invalid (unknown preset or format version, unexpected entries), or
        the weights do not fit the architecture.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DaregError(
            f"Model folder {folder} does not exist or is not a folder; pass a dareg model folder."
        )
    verify_manifest(folder, list(MODEL_FILES))
    config = read_config(folder / CONFIG_FILE)
    network = build_from_config(config)
    try:
        network.load_weights(str(folder / WEIGHTS_FILE))
    except (ValueError, OSError, KeyError) as error:
        raise DaregError(
            f"The weights in {folder / WEIGHTS_FILE} do not fit the architecture in its config ({error}). "
            "Re-download or re-train the model."
        ) from None
    return LoadedModel(network, config)
