"""``ModelConfig``: the data in a model folder's ``config.json`` (TensorFlow-free).

Why a strict schema: ``load_model`` rebuilds the network from this data only (never from serialised
code), so anything it does not know - extra keys such as a Keras ``class_name``/``Lambda``, an
unknown preset or a newer format - is rejected with a message instead of being guessed at.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import DaregError
from .specs import check_grid_shape, check_integration_steps, resolve_spec

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelConfig:
    """What a trained model is and how to use it.

    Parameters
    ----------
    preset : architecture name in ``dareg.models.PRESETS``.
    grid_shape : (D, H, W) model grid in array order z, y, x, voxels.
    integration_steps : scaling-and-squaring steps (0 = the network predicts the displacement).
    normalisation : how intensities were mapped to [0, 1] for training, stored as given, e.g.
        ``{"kind": "ct_window", "low": -200, "high": 300}`` (HU).
    design : training design, e.g. "UW-NSD", or "untrained".
    training : facts about the training run (data, epochs, losses...), JSON values.
    created : ISO 8601 UTC timestamp.
    dareg_version : version of dareg that wrote the model.
    format_version : version of this folder format.
    """

    preset: str
    grid_shape: tuple[int, int, int]
    integration_steps: int = 0
    normalisation: dict = field(default_factory=dict)
    design: str = "untrained"
    training: dict = field(default_factory=dict)
    created: str = field(default_factory=_now)
    dareg_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Validated on construction so that no invalid config can exist, whether built in code or read
        # from a file (frozen dataclass: normalised values are set through object.__setattr__).
        if self.format_version != FORMAT_VERSION:
            raise DaregError(
                f"format_version {self.format_version!r} is not supported: this dareg ({__version__}) reads "
                f"only format {FORMAT_VERSION}. Update dareg or use a model made for this version."
            )
        for name, kind in _FIELD_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                kind_name = "JSON object (dict)" if kind is dict else "string"
                raise DaregError(f"{name!r} must be a {kind_name}, got {getattr(self, name)!r}.")
        spec = resolve_spec(self.preset)
        object.__setattr__(self, "grid_shape", check_grid_shape(spec, self.grid_shape))
        object.__setattr__(self, "integration_steps", check_integration_steps(self.integration_steps))

    def to_json(self) -> str:
        """Pretty JSON text of the config (grid_shape as a list)."""
        data = asdict(self)
        data["grid_shape"] = list(self.grid_shape)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data, source: str = "config") -> ModelConfig:
        """Validate and build a config from parsed JSON; DaregError names ``source`` and the problem."""
        if not isinstance(data, dict):
            raise DaregError(
                f"Model config {source} must be a JSON object. Re-download or re-train the model."
            )
        known = {f.name for f in fields(cls)}
        unexpected = sorted(set(data) - known)
        missing = sorted({"preset", "grid_shape", "format_version"} - set(data))
        if unexpected or missing:
            raise DaregError(
                f"Model config {source} has unexpected entries {unexpected} / lacks entries {missing}; "
                f"a model config holds only the data {sorted(known)}. Re-download or re-train the model."
            )
        try:
            return cls(**data)
        except DaregError as error:
            raise DaregError(f"Model config {source}: {error}") from None


_FIELD_TYPES = {
    "preset": str,
    "normalisation": dict,
    "design": str,
    "training": dict,
    "created": str,
    "dareg_version": str,
}


def read_config(path: Path) -> ModelConfig:
    """Read and validate a ``config.json``; DaregError if it is unreadable or invalid."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DaregError(
            f"Model config {path} cannot be read as JSON ({error}). Re-download or re-train the model."
        ) from None
    return ModelConfig.from_dict(data, str(path))
