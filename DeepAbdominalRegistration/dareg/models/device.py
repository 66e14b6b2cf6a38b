"""Choose the TensorFlow device for inference/training without touching environment variables."""

from __future__ import annotations

import tensorflow as tf

from ..errors import DaregError

DEVICES = ("auto", "cpu", "gpu")


def select_device(device: str) -> str:
    """TensorFlow device string for ``"auto"``, ``"cpu"`` or ``"gpu"``; use it as ``with tf.device(...)``.

    "auto" picks the first GPU when TensorFlow sees one, else the CPU. Asking for "gpu" without a
    visible GPU is an error rather than a silent CPU fallback, because the user expects GPU speed.
    """
    if device not in DEVICES:
        raise DaregError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if device == "gpu" and not has_gpu:
        raise DaregError(
            "device 'gpu' was requested but TensorFlow sees no GPU (a CUDA build of TensorFlow and a "
            "working NVIDIA driver are needed); use device 'cpu' or 'auto'."
        )
    return "/GPU:0" if device != "cpu" and has_gpu else "/CPU:0"
