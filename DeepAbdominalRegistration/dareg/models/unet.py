"""The registration network: a VoxelMorph-style U-Net that predicts a voxel flow, plus the warp.

Graph (``build_registration_network``)::

    moving, fixed (B, D, H, W, 1) -> concat (moving first) -> [average-pool by f]
      -> U-Net -> flow conv (3 channels, linear) -> [scaling and squaring] -> [linear upsample x f, * f]
      -> flow (B, D, H, W, 3);   warped = SpatialTransformer(moving, flow)

U-Net as voxelmorph 0.1 ``VxmDense`` (what the DDMR models were trained with): one Conv3D k=3 'same'
he_normal + LeakyReLU(0.2) per level; encoder conv then MaxPool 2; decoder conv then nearest
UpSampling 2 then concat([upsampled, skip]) with the skip = the encoder conv output of that resolution;
then full-resolution "head" convs; the flow conv is initialised N(0, 1e-5) so an untrained network
predicts (almost) the identity. Layer names follow voxelmorph (``unet_enc_conv_0_0`` ... ``flow``) so
released weights can be mapped by name.

Grid shape (D, H, W) is the model grid in array order z, y, x; the flow is in model-grid voxels,
channel c = displacement along array axis c (see ``dareg.geometry``).
"""

from __future__ import annotations

import keras

from .integrate import VelocityIntegration
from .resize import FlowUpsample
from .specs import UNetSpec, check_grid_shape, check_integration_steps, resolve_spec
from .transformer import SpatialTransformer


def _conv_block(x, filters: int, name: str):
    x = keras.layers.Conv3D(filters, 3, padding="same", kernel_initializer="he_normal", name=name)(x)
    return keras.layers.LeakyReLU(negative_slope=0.2, name=f"{name}_activation")(x)


def _unet(x, spec: UNetSpec):
    """U-Net body on a (B, d, h, w, 2) tensor -> (B, d, h, w, head[-1] or decoder[-1] + skip)."""
    skips = []
    for level, filters in enumerate(spec.encoder):
        x = _conv_block(x, filters, f"unet_enc_conv_{level}_0")
        skips.append(x)
        x = keras.layers.MaxPooling3D(2, name=f"unet_enc_pooling_{level}")(x)
    for filters in spec.decoder:
        level = len(skips) - 1
        x = _conv_block(x, filters, f"unet_dec_conv_{level}_0")
        x = keras.layers.UpSampling3D(2, name=f"unet_dec_upsample_{level}")(x)
        x = keras.layers.Concatenate(name=f"unet_dec_concat_{level}")([x, skips.pop()])
    for index, filters in enumerate(spec.head):
        x = _conv_block(x, filters, f"unet_dec_final_conv_{index}")
    return x


def build_registration_network(
    preset: str | UNetSpec, grid_shape, *, integration_steps: int = 0
) -> keras.Model:
    """Build the registration network for a model grid.

    Parameters
    ----------
    preset : a name in ``PRESETS`` ("paper", "compact") or a ``UNetSpec``.
    grid_shape : (D, H, W) model grid in array order z, y, x; each a multiple of the spec's
        ``grid_multiple`` (64 for "paper", 32 for "compact").
    integration_steps : 0 = the flow conv predicts the displacement (as the paper); > 0 = it predicts
        a stationary velocity integrated by that many scaling-and-squaring steps (diffeomorphic mode;
        with ``downsample`` > 1 the integration runs at the U-Net's resolution, before upsampling).

    Returns
    -------
    keras.Model with inputs ``[moving, fixed]``, each (B, D, H, W, 1) float32 (intensities in [0, 1]),
    and a dict output ``{"flow": (B, D, H, W, 3) voxels, "warped": (B, D, H, W, 1)}`` where
    ``warped(p) = moving(p + flow(p))`` (trilinear, border-clamped).
    """
    spec = resolve_spec(preset)
    shape = check_grid_shape(spec, grid_shape)
    steps = check_integration_steps(integration_steps)
    moving = keras.Input(shape=(*shape, 1), name="moving")
    fixed = keras.Input(shape=(*shape, 1), name="fixed")
    x = keras.layers.Concatenate(name="input_concat")([moving, fixed])
    if spec.downsample > 1:
        x = keras.layers.AveragePooling3D(spec.downsample, name="input_downsample")(x)
    x = _unet(x, spec)
    flow = keras.layers.Conv3D(
        3,
        3,
        padding="same",
        kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=1e-5),
        bias_initializer="zeros",
        name="flow",
    )(x)
    if steps:
        flow = VelocityIntegration(steps, name="flow_integration")(flow)
    if spec.downsample > 1:
        flow = FlowUpsample(spec.downsample, name="flow_upsample")(flow)
    warped = SpatialTransformer("linear", name="transformer")([moving, flow])
    outputs = {"flow": flow, "warped": warped}
    return keras.Model(inputs=[moving, fixed], outputs=outputs, name=f"dareg_{spec.name}")
