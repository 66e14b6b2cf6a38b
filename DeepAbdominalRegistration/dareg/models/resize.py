"""Change a displacement field's grid resolution by an integer factor (coarse U-Net -> model grid).

Why: the ``compact`` preset runs its U-Net on the model grid average-pooled by ``f``; its flow must
come back to the full grid both resampled AND rescaled, because a displacement of one coarse voxel is
``f`` fine voxels.

Grid correspondence (the one average pooling implies): coarse voxel ``k`` is the mean of fine voxels
``f k .. f k + f - 1``, so its centre sits at fine coordinate ``f k + (f - 1) / 2``; equivalently fine
voxel ``j`` lies at coarse coordinate ``(j + 0.5) / f - 0.5`` ("half-pixel" alignment). Values are
interpolated linearly along each axis, clamping at the border (as the spatial transformer does).
"""

from __future__ import annotations

import keras
from keras import ops


def _axis_slice(volume, axis: int, start: int | None, stop: int | None):
    """``volume[..., start:stop, ...]`` along ``axis`` of a (B, D, H, W, C) tensor."""
    return volume[tuple(slice(start, stop) if a == axis else slice(None) for a in range(5))]


def _shift_clamped(volume, axis: int, step: int):
    """``volume`` shifted by one voxel along ``axis`` (step +1: next voxel, -1: previous), border repeated."""
    if step > 0:
        parts = [_axis_slice(volume, axis, 1, None), _axis_slice(volume, axis, -1, None)]
    else:
        parts = [_axis_slice(volume, axis, None, 1), _axis_slice(volume, axis, None, -1)]
    return ops.concatenate(parts, axis=axis)


def _upsample_axis(volume, axis: int, factor: int):
    """Linear half-pixel upsampling of a (B, D, H, W, C) tensor along one spatial ``axis`` (1..3)."""
    previous, following = _shift_clamped(volume, axis, -1), _shift_clamped(volume, axis, +1)
    phases = []
    for phase in range(factor):
        # Fine voxel f*i + phase sits at coarse coordinate i + offset, offset in (-0.5, 0.5).
        offset = (phase + 0.5) / factor - 0.5
        neighbour = following if offset >= 0 else previous
        phases.append(volume + abs(offset) * (neighbour - volume))
    stacked = ops.stack(phases, axis=axis + 1)
    shape = list(volume.shape)
    shape[0] = -1
    shape[axis] = shape[axis] * factor
    return ops.reshape(stacked, shape)


def upsample_flow(flow, factor: int):
    """Upsample a voxel displacement field by an integer ``factor`` and rescale it to fine voxels.

    Parameters
    ----------
    flow : tensor (B, d, h, w, 3), displacement in coarse voxels, channel c along axis c.
    factor : integer >= 1.

    Returns
    -------
    tensor (B, f d, f h, f w, 3), displacement in fine voxels (values multiplied by ``factor``).
    """
    if factor == 1:
        return flow
    for axis in (1, 2, 3):
        flow = _upsample_axis(flow, axis, factor)
    return flow * float(factor)


class FlowUpsample(keras.layers.Layer):
    """Keras layer around :func:`upsample_flow`.

    Parameters
    ----------
    factor : integer upsampling factor per axis.
    """

    def __init__(self, factor: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)

    def call(self, flow):
        return upsample_flow(flow, self.factor)

    def compute_output_shape(self, input_shape):
        batch, *spatial, channels = input_shape
        return (batch, *(None if s is None else s * self.factor for s in spatial), channels)

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}
