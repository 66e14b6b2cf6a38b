"""Registration networks and model files.

Modules (one concern each):

- ``specs``       architectures as data: ``UNetSpec``, ``PRESETS`` ("paper", "compact"), grid rules
- ``unet``        ``build_registration_network``: U-Net -> flow -> warped (Keras)
- ``transformer`` ``warp`` / ``SpatialTransformer``: out(p) = in(p + u(p)), border-clamped
- ``resize``      ``upsample_flow`` / ``FlowUpsample``: coarse flow -> model grid
- ``integrate``   ``integrate_velocity`` / ``VelocityIntegration``: scaling and squaring
- ``config``      ``ModelConfig``: the strict, data-only config.json
- ``manifest``    SHA-256 manifest of a model folder
- ``modelio``     ``save_model`` / ``load_model`` (atomic, checksum-verified, no code deserialised)
- ``registry``    bundled models: ``list_bundled_models``, ``default_model_name``, ``resolve_model``
- ``device``      ``select_device``

Names are imported lazily: ``specs``, ``config``, ``manifest`` and ``registry`` do not import
TensorFlow, so e.g. listing bundled models stays cheap and TensorFlow-free.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "UNetSpec": "specs",
    "PRESETS": "specs",
    "build_registration_network": "unet",
    "warp": "transformer",
    "SpatialTransformer": "transformer",
    "upsample_flow": "resize",
    "FlowUpsample": "resize",
    "integrate_velocity": "integrate",
    "VelocityIntegration": "integrate",
    "ModelConfig": "config",
    "LoadedModel": "modelio",
    "save_model": "modelio",
    "load_model": "modelio",
    "list_bundled_models": "registry",
    "default_model_name": "registry",
    "resolve_model": "registry",
    "select_device": "device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
