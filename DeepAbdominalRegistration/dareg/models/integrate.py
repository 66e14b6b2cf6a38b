"""Scaling and squaring: turn a stationary velocity field into a (near-)diffeomorphic displacement.

Why: the DDMR models predict a displacement directly and can fold; integrating a smooth stationary
velocity ``v`` gives ``phi = exp(v)``, whose inverse is ``exp(-v)``, so the map cannot fold when
``v`` is smooth enough (Arsigny et al. 2006; voxelmorph's ``int_steps``).

Algorithm: ``u <- v / 2**steps``; then ``steps`` times ``u <- u + warp(u, u)``, i.e. the map
``x -> x + u(x)`` is composed with itself (``phi_{2t} = phi_t o phi_t``).
"""

from __future__ import annotations

import keras

from .transformer import warp


def integrate_velocity(velocity, steps: int):
    """Integrate a stationary velocity field by scaling and squaring.

    Parameters
    ----------
    velocity : tensor (B, D, H, W, 3), voxels per unit time, channel c along array axis c.
    steps : number of squarings (>= 0); 0 returns ``velocity`` unchanged (plain displacement mode).

    Returns
    -------
    tensor (B, D, H, W, 3): displacement ``u`` of ``exp(v)`` in voxels (``warped(p) = in(p + u(p))``).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    displacement = velocity / float(2**steps)
    for _ in range(steps):
        displacement = displacement + warp(displacement, displacement, interpolation="linear")
    return displacement


class VelocityIntegration(keras.layers.Layer):
    """Keras layer around :func:`integrate_velocity`.

    Parameters
    ----------
    steps : number of squarings.
    """

    def __init__(self, steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.steps = int(steps)

    def call(self, velocity):
        return integrate_velocity(velocity, self.steps)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "steps": self.steps}
