"""Network architectures as pure data: ``UNetSpec``, the named ``PRESETS`` and grid-shape rules.

Kept free of TensorFlow so a model's config can be validated, and bundled models listed, without
loading TensorFlow (the Slicer GUI process never imports it).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..errors import DaregError


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a registration U-Net (what a model's config.json names by preset).

    Parameters
    ----------
    name : preset name.
    encoder : filters of the encoder conv at each level, finest first; each is followed by MaxPool 2.
    decoder : filters of the decoder conv at each level, coarsest first (same length as ``encoder``);
        each is followed by UpSampling 2 and the concat with the encoder output of that resolution.
    head : filters of the extra convs at the U-Net's full resolution, before the flow conv.
    downsample : the U-Net runs on the input average-pooled by this factor; the flow is linearly
        upsampled back and multiplied by it (1 = full resolution, as the paper).
    """

    name: str
    encoder: tuple[int, ...]
    decoder: tuple[int, ...]
    head: tuple[int, ...]
    downsample: int = 1

    def __post_init__(self) -> None:
        if len(self.encoder) != len(self.decoder) or not self.encoder:
            raise ValueError(
                f"encoder and decoder need the same non-zero length, got {self.encoder}, {self.decoder}"
            )
        if self.downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {self.downsample}")

    @classmethod
    def from_voxelmorph(cls, name: str, enc_nf: list[int], dec_nf: list[int]) -> UNetSpec:
        """Spec from voxelmorph's flat ``enc_nf`` / ``dec_nf`` lists (dec_nf = level convs + head convs)."""
        levels = len(enc_nf)
        return cls(name, tuple(enc_nf), tuple(dec_nf[:levels]), tuple(dec_nf[levels:]))

    @property
    def grid_multiple(self) -> int:
        """Every grid size must be a multiple of this: each level halves it, after the downsampling."""
        return self.downsample * 2 ** len(self.encoder)


# Each step costs one full-grid warp, and voxelmorph's default of 7 already keeps every sub-step of
# any anatomical velocity far below a voxel: a much larger value is a mistake, not a setting.
MAX_INTEGRATION_STEPS = 16

PRESETS: dict[str, UNetSpec] = {
    # Exactly the released DDMR models (reference section 2.1): 84,921,011 parameters (340 MB),
    # about 163 GMAC and 5 s per 128^3 forward pass on this project's 2 CPU cores.
    "paper": UNetSpec("paper", (32, 64, 128, 256, 512, 1024), (1024, 512, 256, 128, 64, 32), (16, 16)),
    # CPU-friendly, 1,329,763 parameters (5.3 MB). Full-resolution convs dominate the cost (one
    # 16->16 conv at 128^3 is 14.5 GMAC), so the U-Net runs on the input average-pooled by 2 with
    # thin top levels; deep levels are nearly free, hence the wider bottom. Measured on 2 shared CPU
    # cores, 128^3, batch 1, whole network incl. the warp: predict_on_batch 0.19-0.35 s depending on
    # machine load, eager call 0.28-0.45 s, one Adam training step (forward + backward) 0.52 s; with
    # integration_steps=7 predict_on_batch 0.32 s. Of the forward pass the 128^3 trilinear warp is
    # 0.1-0.2 s and the flow upsampling 0.02 s. Alternatives measured in the same session: 5 levels up
    # to 256 filters (5.3 M params) cost the same but need grids in multiples of 64; voxelmorph's
    # default widths at half resolution ([16,32,32,32]/[32,32,32,32]+[32,16,16]) 0.5 s, because of its
    # 32-filter full-resolution decoder and head.
    "compact": UNetSpec("compact", (16, 32, 64, 128), (128, 64, 32, 16), (16,), downsample=2),
}


def resolve_spec(preset: str | UNetSpec) -> UNetSpec:
    """The spec for a preset name (or the spec itself); unknown names raise DaregError."""
    if isinstance(preset, UNetSpec):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise DaregError(
            f"Unknown network preset {preset!r}; available presets: {', '.join(sorted(PRESETS))}."
        ) from None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integration_steps(steps) -> int:
    """Validate the number of scaling-and-squaring steps (0 = plain displacement); DaregError if invalid."""
    if not _is_int(steps) or not 0 <= steps <= MAX_INTEGRATION_STEPS:
        raise DaregError(
            f"integration_steps must be an integer from 0 (plain displacement) to {MAX_INTEGRATION_STEPS}, "
            f"got {steps!r}."
        )
    return int(steps)


def check_grid_shape(spec: UNetSpec, grid_shape) -> tuple[int, int, int]:
    """Validate ``grid_shape`` (D, H, W) for ``spec``, return it as ints; DaregError says which sizes work."""
    try:
        shape = tuple(grid_shape)
    except TypeError:
        shape = (grid_shape,)
    multiple = spec.grid_multiple
    if len(shape) != 3 or any(not _is_int(s) or s <= 0 or s % multiple for s in shape):
        examples = ", ".join(str(multiple * k) for k in range(1, 5))
        raise DaregError(
            f"Model grid shape {shape} does not fit network preset {spec.name!r}: it needs 3 sizes, "
            f"each a positive multiple of {multiple} (e.g. {examples}). Choose such a grid shape."
        )
    return tuple(int(s) for s in shape)
