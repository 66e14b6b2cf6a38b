"""Procedural abdominal CT phantom with labels, and seeded synthetic moving images with a KNOWN deformation.

Why a phantom: the demo and the fast tests need abdominal CT-like data that the project owns, of any
size, spacing and orientation, with exact labels (liver, portal and hepatic vein trees, tumour, ...).

How it is built: the anatomy is a list of layers (implicit shapes with an approximate signed distance
in mm, negative inside, each with a tissue intensity and a label) defined in PHYSICAL patient LPS
millimetres around the patient centre (0, 0, 0). The seed alone decides the anatomy; the grid only
samples it, so the same seed gives the same anatomy at any spacing or orientation. Boundaries are made
irregular by random Fourier fields, which are smooth functions of physical position (never of voxel
indices). Each layer is evaluated only inside its bounding box, which keeps a 96 x 80 x 64 phantom
well under a second.

Synthetic pairs: ``moving(y) = fixed(S(y))`` with ``S`` = smooth random B-spline o random rigid, and
landmarks with ``fixed_landmarks[n] = S(moving_landmarks[n])`` exactly, so the target registration
error of an estimated fixed -> moving transform ``T`` is ``||T(p_fixed) - p_moving||``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dareg.errors import DaregError
from dareg.geometry import index_to_physical_matrix, physical_corners, resample_to_reference

LABELS: dict[int, str] = {
    1: "liver",
    2: "portal_vein",
    3: "hepatic_veins",
    4: "tumour",
    5: "spine",
    6: "kidney_right",
    7: "kidney_left",
    8: "aorta",
    9: "ivc",
    10: "body_wall",
}
_LABEL_ID = {name: label for label, name in LABELS.items()}

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z LPS mm, each the shape of the region
Bounds = tuple[np.ndarray, np.ndarray]  # (lower, upper) corners of an axis-aligned box, LPS mm

_AIR_HU = -1000.0
_FAR_MM = 1.0e5  # "unbounded" box half-size; far beyond any CT field of view
_NOISE_HU = 10.0
_BLUR_VOXELS = 0.5  # anti-aliasing blur: point sampling of sharp shapes otherwise gives staircases


@dataclass(frozen=True)
class Phantom:
    """A phantom CT with its label map (same grid).

    Attributes
    ----------
    image : sitk.Image
        sitkFloat32, Hounsfield units.
    labels : sitk.Image
        sitkUInt8, ids of :data:`LABELS` (0 = unlabelled tissue or air).
    names : dict[int, str]
        Label id -> name.
    """

    image: sitk.Image
    labels: sitk.Image
    names: dict[int, str]


@dataclass(frozen=True)
class SyntheticPair:
    """A moving image made from a fixed one through a known transform ``S`` (moving -> fixed).

    Attributes
    ----------
    moving_image : sitk.Image
        sitkFloat32 HU on the reference grid: ``moving(y) = fixed(S(y))`` plus independent noise.
    moving_labels : sitk.Image
        The fixed labels resampled through ``S`` (nearest neighbour), fixed labels' pixel type.
    moving_to_fixed : sitk.Transform
        ``S``, a CompositeTransform: B-spline o rigid. The ideal registration transform (fixed -> moving)
        is its inverse.
    fixed_landmarks : np.ndarray
        (N, 3) LPS mm, ``fixed_landmarks[n] = S(moving_landmarks[n])`` exactly.
    moving_landmarks : np.ndarray
        (N, 3) LPS mm, voxel centres of the moving grid inside the requested labels.
    """

    moving_image: sitk.Image
    moving_labels: sitk.Image
    moving_to_fixed: sitk.Transform
    fixed_landmarks: np.ndarray
    moving_landmarks: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Implicit shapes (approximate signed distance in mm, negative inside)
# ----------------------------------------------------------------------------------------------------


class _Shape(Protocol):
    def sdf(self, p: Coords) -> np.ndarray: ...

    def bounds(self) -> Bounds: ...


def _unbounded() -> Bounds:
    return np.full(3, -_FAR_MM), np.full(3, _FAR_MM)


def _rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx (3, 3); its columns are the shape's local axes in LPS."""
    ax, ay, az = np.deg2rad(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Ellipsoid:
    """Ellipsoid; a huge semi-axis along local z makes an elliptic cylinder (body, aorta, spine)."""

    centre: np.ndarray
    semi: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def sdf(self, p: Coords) -> np.ndarray:
        # Scaled "normalised radius - 1": exact on the surface, a lower bound of the distance elsewhere
        # up to the axis ratio, which is all layers and margins need.
        # Python floats keep float32 coordinates float32 (NumPy scalars would promote to float64).
        centre, semi, rot = self.centre.tolist(), self.semi.tolist(), self.rotation.tolist()
        delta = [p[i] - centre[i] for i in range(3)]
        radius2 = 0.0
        for k in range(3):
            local = delta[0] * rot[0][k] + delta[1] * rot[1][k] + delta[2] * rot[2][k]
            radius2 = radius2 + (local / semi[k]) ** 2
        return (np.sqrt(radius2) - 1.0) * min(semi)

    def bounds(self) -> Bounds:
        half = np.sqrt((self.rotation**2) @ (self.semi**2))  # exact box of a rotated ellipsoid
        half = np.minimum(half, _FAR_MM)
        return self.centre - half, self.centre + half


@dataclass(frozen=True)
class _HalfSpace:
    """Points with ``p . normal <= offset`` (exact signed distance; normal is unit length)."""

    normal: np.ndarray
    offset: float

    def sdf(self, p: Coords) -> np.ndarray:
        normal = self.normal.tolist()
        return p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2] - float(self.offset)

    def bounds(self) -> Bounds:
        return _unbounded()


@dataclass(frozen=True)
class _ZSlabs:
    """Periodic slabs along z (intervertebral discs): thickness ``thickness`` every ``period`` mm."""

    period: float
    thickness: float
    phase: float

    def sdf(self, p: Coords) -> np.ndarray:
        local = np.mod(p[2] - self.phase + 0.5 * self.period, self.period) - 0.5 * self.period
        return np.abs(local) - 0.5 * self.thickness

    def bounds(self) -> Bounds:
        return _unbounded()


@dataclass(frozen=True)
class _Segment:
    """Tapered tube from ``start`` (radius r0) to ``end`` (radius r1): one vessel piece."""

    start: np.ndarray
    end: np.ndarray
    r0: float
    r1: float

    def sdf(self, p: Coords) -> np.ndarray:
        start, axis = self.start.tolist(), (self.end - self.start).tolist()
        rel = [p[i] - start[i] for i in range(3)]
        t = (rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / sum(a * a for a in axis)
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((rel[i] - t * axis[i]) ** 2 for i in range(3))
        return np.sqrt(dist2) - (float(self.r0) + t * float(self.r1 - self.r0))

    def bounds(self) -> Bounds:
        radius = max(self.r0, self.r1)
        return np.minimum(self.start, self.end) - radius, np.maximum(self.start, self.end) + radius


@dataclass(frozen=True)
class _Offset:
    """``shape`` grown by ``distance`` mm (negative shrinks): parallel layers (fat, muscle, cortex)."""

    shape: _Shape
    distance: float

    def sdf(self, p: Coords) -> np.ndarray:
        return self.shape.sdf(p) - self.distance

    def bounds(self) -> Bounds:
        lower, upper = self.shape.bounds()
        grow = max(self.distance, 0.0)
        return lower - grow, upper + grow


@dataclass(frozen=True)
class _Intersection:
    shapes: tuple[_Shape, ...]

    def sdf(self, p: Coords) -> np.ndarray:
        return np.maximum.reduce([shape.sdf(p) for shape in self.shapes])

    def bounds(self) -> Bounds:
        boxes = [shape.bounds() for shape in self.shapes]
        return np.max([box[0] for box in boxes], axis=0), np.min([box[1] for box in boxes], axis=0)


@dataclass(frozen=True)
class _Difference:
    """``base`` minus each cut grown by its margin: organs leave room for their neighbours."""

    base: _Shape
    cuts: tuple[tuple[_Shape, float], ...]

    def sdf(self, p: Coords) -> np.ndarray:
        result = self.base.sdf(p)
        for cut, margin in self.cuts:
            result = np.maximum(result, margin - cut.sdf(p))
        return result

    def bounds(self) -> Bounds:
        return self.base.bounds()


@dataclass(frozen=True)
class _SmoothUnion:
    """Polynomial smooth minimum of two shapes: lobes that merge without a crease."""

    first: _Shape
    second: _Shape
    blend_mm: float

    def sdf(self, p: Coords) -> np.ndarray:
        a, b = self.first.sdf(p), self.second.sdf(p)
        h = np.clip(0.5 + 0.5 * (b - a) / self.blend_mm, 0.0, 1.0)
        return b + (a - b) * h - self.blend_mm * h * (1.0 - h)

    def bounds(self) -> Bounds:
        (l1, u1), (l2, u2) = self.first.bounds(), self.second.bounds()
        return np.minimum(l1, l2), np.maximum(u1, u2)


@dataclass(frozen=True)
class _Field:
    """Smooth random field of physical position: random Fourier features of a Gaussian process.

    ``f(p) = sqrt(2 / K) sum_k cos(omega_k . p + phi_k)`` with ``omega_k ~ N(0, 1 / length^2)``
    has about unit variance and correlation length ``length_mm``, and is the same function of
    the position whatever grid samples it.
    """

    omega: np.ndarray  # (K, 3) rad/mm
    phase: np.ndarray  # (K,) rad

    @classmethod
    def random(cls, rng: np.random.Generator, length_mm: float, n_modes: int = 16) -> _Field:
        return cls(rng.normal(scale=1.0 / length_mm, size=(n_modes, 3)), rng.uniform(0, 2 * np.pi, n_modes))

    def __call__(self, p: Coords) -> np.ndarray:
        total = np.zeros(np.broadcast_shapes(*(c.shape for c in p)), dtype=np.float32)
        for omega, phase in zip(self.omega.tolist(), self.phase.tolist(), strict=True):
            total += np.cos(p[0] * omega[0] + p[1] * omega[1] + p[2] * omega[2] + phase)
        return total * np.float32(math.sqrt(2.0 / len(self.phase)))


@dataclass(frozen=True)
class _FieldLevel:
    """Where a random field exceeds ``level`` (sign-correct, not a distance: used without margins)."""

    pattern: _Field
    level: float

    def sdf(self, p: Coords) -> np.ndarray:
        return self.level - self.pattern(p)

    def bounds(self) -> Bounds:
        return _unbounded()


@dataclass(frozen=True)
class _Perturbed:
    """``shape`` with its surface moved by at most ``amplitude`` mm: irregular, organ-like boundaries."""

    shape: _Shape
    pattern: _Field
    amplitude: float

    def sdf(self, p: Coords) -> np.ndarray:
        # tanh bounds the perturbation, so the bounding box stays valid.
        return self.shape.sdf(p) + self.amplitude * np.tanh(self.pattern(p))

    def bounds(self) -> Bounds:
        lower, upper = self.shape.bounds()
        return lower - self.amplitude, upper + self.amplitude


# ----------------------------------------------------------------------------------------------------
# Anatomy: layers painted in order, later layers over earlier ones
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tissue:
    """Intensity ``base_hu + texture_hu * texture(p)``: mild, position-bound texture."""

    base_hu: float
    texture_hu: float = 0.0
    texture: _Field | None = None

    def values(self, p: Coords) -> np.ndarray | float:
        if self.texture is None or self.texture_hu == 0.0:
            return self.base_hu
        return self.base_hu + self.texture_hu * self.texture(p)


@dataclass(frozen=True)
class _Layer:
    shape: _Shape
    tissue: _Tissue
    label: int
    clip: _Shape | None = None  # paint only inside this shape too (vessels inside the liver)


def _jitter(rng: np.random.Generator, values, scale) -> np.ndarray:
    """``values`` + uniform noise in +-``scale`` (seeded shape variation between phantoms)."""
    values = np.asarray(values, dtype=float)
    return values + rng.uniform(-1.0, 1.0, size=values.shape) * np.asarray(scale, dtype=float)


def _cylinder(centre_xy, semi_xy, tilt_deg=(0.0, 0.0, 0.0)) -> _Ellipsoid:
    """Elliptic cylinder along z (slightly tilted), as an ellipsoid with a huge z semi-axis."""
    return _Ellipsoid(
        np.array([centre_xy[0], centre_xy[1], 0.0]),
        np.array([semi_xy[0], semi_xy[1], _FAR_MM]),
        _rotation(tilt_deg),
    )


@dataclass(frozen=True)
class _Trunk:
    """Torso layers, and the abdominal cavity that organs must stay inside."""

    cavity: _Shape
    layers: list[_Layer]


def _trunk(rng: np.random.Generator) -> _Trunk:
    """Skin outline with subcutaneous fat, muscle wall, abdominal cavity and back muscles."""
    semi = _jitter(rng, [106.0, 84.0], [3.0, 3.0])
    outline = _Intersection((_cylinder((0.0, -6.0), semi), _HalfSpace(np.array([0.0, 1.0, 0.0]), 72.0)))
    body = _Perturbed(outline, _Field.random(rng, 40.0), 3.0)
    fat_mm, muscle_mm = _jitter(rng, [11.0, 7.0], [3.0, 1.5])
    cavity = _Offset(body, -(fat_mm + muscle_mm))
    soft_tissue = _Tissue(20.0, 8.0, _Field.random(rng, 6.0))
    # Fat between bowel loops (about 18% of the cavity) gives the abdomen its CT look.
    mesenteric_fat = _Intersection((cavity, _FieldLevel(_Field.random(rng, 7.0), 0.9)))
    layers = [
        _Layer(body, _Tissue(-100.0), _LABEL_ID["body_wall"]),
        _Layer(_Offset(body, -fat_mm), _Tissue(40.0), _LABEL_ID["body_wall"]),
        _Layer(cavity, soft_tissue, 0),
        _Layer(mesenteric_fat, _Tissue(-90.0), 0),
    ]
    for side in (-1.0, 1.0):
        paraspinal = _cylinder(_jitter(rng, [27.0 * side, 57.0], 1.5), _jitter(rng, [17.0, 12.0], 1.5))
        layers.append(_Layer(paraspinal, _Tissue(45.0), _LABEL_ID["body_wall"]))
        # Psoas muscles grow towards the pelvis and end around the kidneys' hila.
        psoas = _Ellipsoid(np.array([30.0 * side, 30.0, -100.0]), np.array([13.0, 10.0, 115.0]))
        layers.append(_Layer(psoas, _Tissue(45.0), 0, clip=cavity))
    return _Trunk(cavity, layers)


@dataclass(frozen=True)
class _Retroperitoneum:
    spine_column: _Shape
    aorta: _Shape
    ivc: _Ellipsoid  # the hepatic veins join its axis
    kidney_right: _Shape
    layers: list[_Layer]  # kidneys, aorta, spleen, stomach: painted before the liver
    spine_layers: list[_Layer]  # painted last: bone is never covered


def _retroperitoneum(rng: np.random.Generator, cavity: _Shape) -> _Retroperitoneum:
    """Spine, kidneys (in perirenal fat), aorta, IVC, and unlabelled spleen and stomach."""
    layers: list[_Layer] = []
    kidneys = {}
    for side, name, z in ((-1.0, "kidney_right", -32.0), (1.0, "kidney_left", -20.0)):
        centre = _jitter(rng, [57.0 * side, 26.0, z], [3.0, 2.0, 5.0])
        # Upper poles lean medially and the hila face antero-medially.
        rotation = _rotation(tuple(_jitter(rng, [0.0, 12.0 * side, -25.0 * side], 4.0)))
        semi = _jitter(rng, [21.0, 15.0, 46.0], [2.0, 1.5, 4.0])
        kidney = _Ellipsoid(centre, semi, rotation)
        hilum = _Ellipsoid(
            centre + rotation @ np.array([-17.0 * side, 0.0, 0.0]), np.array([8.0, 6.0, 12.0]), rotation
        )
        layers.append(_Layer(_Offset(kidney, 8.0), _Tissue(-90.0), 0, clip=cavity))
        kidneys[name] = _Difference(kidney, ((hilum, 0.0),))
        layers.append(_Layer(kidneys[name], _Tissue(150.0), _LABEL_ID[name], clip=cavity))

    spleen = _Ellipsoid(
        _jitter(rng, [70.0, 28.0, 45.0], 3.0), _jitter(rng, [17.0, 30.0, 40.0], 2.0), _rotation((0, 0, 30))
    )
    layers.append(_Layer(spleen, _Tissue(55.0), 0, clip=cavity))
    stomach = _Ellipsoid(
        _jitter(rng, [42.0, -26.0, 45.0], 3.0), _jitter(rng, [30.0, 27.0, 36.0], 2.0), _rotation((0, 20, 20))
    )
    content = _Offset(stomach, -4.0)
    layers += [
        _Layer(stomach, _Tissue(45.0), 0, clip=cavity),
        _Layer(content, _Tissue(10.0), 0, clip=cavity),
        # Swallowed air floats up: anterior in a supine patient.
        _Layer(_Intersection((content, _HalfSpace(np.array([0.0, 1.0, 0.0]), -38.0))), _Tissue(_AIR_HU), 0),
    ]
    aorta = _cylinder(_jitter(rng, [14.0, 1.0], 1.5), [10.0, 10.0], (4.0, -3.0, 0.0))
    ivc = _cylinder(_jitter(rng, [-21.0, 5.0], 1.5), [12.0, 9.0], (-3.0, 2.0, 0.0))
    layers.append(_Layer(aorta, _Tissue(200.0), _LABEL_ID["aorta"]))

    spine_column = _cylinder([0.0, 28.0], [17.0, 14.0])
    spine = _LABEL_ID["spine"]
    period, phase = 35.0, float(rng.uniform(0.0, 35.0))
    discs = _ZSlabs(period, 7.0, phase)
    arch_levels = _ZSlabs(period, 20.0, phase + 0.5 * period)  # posterior arches sit mid-vertebra
    spinous_process = _Intersection((_cylinder([0.0, 64.0], [4.0, 8.0]), arch_levels))
    spine_layers = [
        _Layer(spine_column, _Tissue(700.0), spine),  # cortical shell...
        _Layer(_Offset(spine_column, -2.5), _Tissue(250.0), spine),  # ...around cancellous bone
        _Layer(_Intersection((spine_column, discs)), _Tissue(90.0), spine),
        _Layer(_Intersection((_cylinder([0.0, 53.0], [13.0, 11.0]), arch_levels)), _Tissue(450.0), spine),
        _Layer(spinous_process, _Tissue(450.0), spine),
        _Layer(_cylinder([0.0, 52.0], [7.0, 7.0]), _Tissue(15.0), 0),  # spinal canal
    ]
    return _Retroperitoneum(spine_column, aorta, ivc, kidneys["kidney_right"], layers, spine_layers)


def _liver(rng: np.random.Generator, cavity: _Shape, retro: _Retroperitoneum) -> tuple[_Shape, _Shape]:
    """Liver envelope (lobes with an irregular surface, leaving room for its neighbours), gallbladder."""
    right_lobe = _Ellipsoid(_jitter(rng, [-47.0, -5.0, 31.0], 3.0), _jitter(rng, [44.0, 55.0, 50.0], 3.0))
    left_lobe = _Ellipsoid(
        _jitter(rng, [8.0, -38.0, 50.0], 3.0),
        _jitter(rng, [45.0, 23.0, 27.0], 2.0),
        _rotation((0.0, 10.0, -15.0)),
    )
    lobes = _Perturbed(_SmoothUnion(right_lobe, left_lobe, 20.0), _Field.random(rng, 30.0), 6.0)
    gallbladder = _Ellipsoid(
        _jitter(rng, [-24.0, -50.0, 4.0], 2.0), np.array([12.0, 12.0, 26.0]), _rotation((25, 0, 0))
    )
    cuts = ((retro.kidney_right, 7.0), (retro.spine_column, 5.0), (retro.aorta, 5.0), (gallbladder, 1.5))
    # A thin margin under the abdominal wall keeps the liver inside the cavity.
    envelope = _Intersection((_Difference(lobes, cuts), _Offset(cavity, -2.0)))
    return envelope, gallbladder


def _bend(rng: np.random.Generator, direction: np.ndarray, degrees: float) -> np.ndarray:
    """``direction`` rotated by ``degrees`` about a random perpendicular axis (unit vector)."""
    axis = np.cross(direction, rng.normal(size=3))
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    rotated = direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)
    return rotated / np.linalg.norm(rotated)


def _depth(shape: _Shape, point: np.ndarray) -> float:
    """How deep (mm, positive inside) ``point`` lies in ``shape``."""
    return -float(shape.sdf(tuple(np.array([c]) for c in point))[0])


def _vessel_tree(
    rng: np.random.Generator,
    liver: _Shape,
    roots: list[tuple[np.ndarray, np.ndarray, float]],
    generations: int,
) -> list[_Segment]:
    """Branching tubes of decreasing radius that stay inside the liver.

    Parameters
    ----------
    roots : list of (start, unit direction, radius mm)
        First branches of the tree (LPS mm).
    generations : int
        Bifurcation levels after the roots.

    Each branch is two straight pieces with a slight bend, 4-7 radii long; children leave at 25-45
    degrees with radius 0.78x the parent's (Murray's law for a symmetric split: r^3 = 2 r_child^3).
    A branch whose end would leave the liver is shortened and turned, then dropped.
    """
    segments: list[_Segment] = []
    frontier = list(roots)
    for generation in range(generations + 1):
        children = []
        for start, direction, radius in frontier:
            end_radius = radius * 0.85
            length = float(rng.uniform(4.0, 7.0)) * radius
            for attempt in range(6):
                heading = _bend(rng, direction, 12.0 * attempt)
                middle = start + 0.5 * length * heading
                bent = _bend(rng, heading, float(rng.uniform(5.0, 20.0)))
                end = middle + 0.5 * length * bent
                if _depth(liver, middle) > 0.0 and _depth(liver, end) > end_radius + 1.0:
                    break
                length *= 0.75
            else:
                continue
            mid_radius = 0.5 * (radius + end_radius)
            segments += [
                _Segment(start, middle, radius, mid_radius),
                _Segment(middle, end, mid_radius, end_radius),
            ]
            if generation < generations:
                for sign in (-1.0, 1.0):
                    child = _bend(rng, bent, sign * float(rng.uniform(25.0, 45.0)))
                    children.append((end, child, radius * 0.78))
        frontier = children
    return segments


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=float)
    return vector / np.linalg.norm(vector)


def _portal_tree(rng: np.random.Generator, liver: _Shape) -> tuple[list[_Segment], list[_Segment]]:
    """Extrahepatic trunk (behind the pancreas, in front of the IVC) and the intrahepatic tree."""
    hilum = _jitter(rng, [-22.0, -16.0, 14.0], 2.0)
    trunk = [_Segment(_jitter(rng, [-3.0, -14.0, -35.0], 2.0), hilum, 7.0, 6.5)]
    right = _unit(_jitter(rng, [-0.8, 0.35, 0.45], 0.1))
    left = _unit(_jitter(rng, [0.8, -0.5, 0.35], 0.1))
    return trunk, _vessel_tree(rng, liver, [(hilum, right, 5.5), (hilum, left, 5.0)], 4)


def _hepatic_tree(rng: np.random.Generator, liver: _Shape, ivc: _Ellipsoid) -> list[_Segment]:
    """Right, middle and left hepatic veins draining into the IVC near the liver dome."""
    height = float(rng.uniform(62.0, 70.0))
    axis = ivc.rotation[:, 2]
    confluence = ivc.centre + axis * (height - ivc.centre[2]) / axis[2]  # on the (tilted) IVC axis
    directions = ([-1.0, 0.15, -0.35], [0.1, -1.0, -0.45], [0.8, -0.7, -0.25])
    roots = [(confluence, _unit(_jitter(rng, d, 0.1)), 5.0) for d in directions]
    return _vessel_tree(rng, liver, roots, 3)


def _tumour(rng: np.random.Generator, liver: _Shape) -> _Shape:
    """Hypodense lesion with a lobulated surface, deep enough to lie inside the liver."""
    radius = float(rng.uniform(10.0, 16.0))
    lower, upper = liver.bounds()
    for _ in range(2000):
        centre = rng.uniform(lower, upper)
        if _depth(liver, centre) > radius + 8.0:
            break
    else:  # unreachable for the lobe sizes above; kept so a bad edit fails loudly
        raise RuntimeError("no room for the tumour inside the liver")
    return _Perturbed(_Ellipsoid(centre, np.full(3, radius)), _Field.random(rng, 8.0), 2.5)


def _anatomy(seeds: np.random.SeedSequence) -> list[_Layer]:
    """All layers of the phantom, from the seed alone (no grid: same anatomy at any sampling)."""
    # One stream per part, so that changing one part's draws leaves the others unchanged.
    trunk_rng, retro_rng, liver_rng, portal_rng, hepatic_rng, tumour_rng = (
        np.random.default_rng(s) for s in seeds.spawn(6)
    )
    trunk = _trunk(trunk_rng)
    retro = _retroperitoneum(retro_rng, trunk.cavity)
    liver, gallbladder = _liver(liver_rng, trunk.cavity, retro)
    portal_trunk, portal = _portal_tree(portal_rng, liver)
    hepatic = _hepatic_tree(hepatic_rng, liver, retro.ivc)
    tumour = _tumour(tumour_rng, liver)
    parenchyma = _Tissue(60.0, 4.0, _Field.random(liver_rng, 5.0))
    blood = _Tissue(180.0)
    return [
        *trunk.layers,
        *retro.layers,
        _Layer(gallbladder, _Tissue(10.0), 0, clip=trunk.cavity),
        _Layer(liver, parenchyma, _LABEL_ID["liver"]),
        *[_Layer(s, blood, _LABEL_ID["portal_vein"], clip=trunk.cavity) for s in portal_trunk],
        *[_Layer(s, blood, _LABEL_ID["portal_vein"], clip=liver) for s in portal],
        *[_Layer(s, blood, _LABEL_ID["hepatic_veins"], clip=liver) for s in hepatic],
        _Layer(tumour, _Tissue(20.0, 5.0, _Field.random(tumour_rng, 4.0)), _LABEL_ID["tumour"], clip=liver),
        _Layer(retro.ivc, _Tissue(160.0), _LABEL_ID["ivc"], clip=trunk.cavity),
        *retro.spine_layers,
    ]


# ----------------------------------------------------------------------------------------------------
# Rendering on a grid
# ----------------------------------------------------------------------------------------------------


class _Grid:
    """Physical position (LPS mm) of every voxel of an image grid, with sub-box access."""

    def __init__(self, size, spacing, origin, direction) -> None:
        self.size = np.asarray(size, dtype=int)
        self.matrix = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
        self.origin = np.asarray(origin, dtype=float)
        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in self.size[::-1]], indexing="ij")
        # float32 is ample for mm positions and halves the cost of every shape evaluation.
        m, o = self.matrix.tolist(), self.origin.tolist()
        self.xyz = [m[a][0] * i + m[a][1] * j + m[a][2] * k + o[a] for a in range(3)]

    def region(self, bounds: Bounds) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the voxels whose centres may lie in the box; None if none."""
        lower, upper = (np.clip(b, -_FAR_MM, _FAR_MM) for b in bounds)
        corners = np.array(
            [np.where(np.array(bits, dtype=bool), upper, lower) for bits in np.ndindex(2, 2, 2)]
        )
        index = np.linalg.solve(self.matrix, (corners - self.origin).T)  # (3, 8) continuous (i, j, k)
        start = np.clip(np.floor(index.min(axis=1)).astype(int), 0, self.size)
        stop = np.clip(np.ceil(index.max(axis=1)).astype(int) + 1, 0, self.size)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(start[a]), int(stop[a])) for a in (2, 1, 0))

    def coords(self, region: tuple[slice, slice, slice]) -> Coords:
        return tuple(c[region] for c in self.xyz)


def _inside(shape: _Shape, grid: _Grid) -> np.ndarray:
    """Boolean mask (z, y, x) of the voxels inside ``shape``, evaluated only in its bounding box."""
    mask = np.zeros(tuple(grid.size[::-1]), dtype=bool)
    region = grid.region(shape.bounds())
    if region is not None:
        mask[region] = shape.sdf(grid.coords(region)) <= 0.0
    return mask


def _render(layers: list[_Layer], grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Paint the layers in order; returns (HU float32, labels uint8), arrays (z, y, x)."""
    shape = tuple(grid.size[::-1])
    hu = np.full(shape, _AIR_HU, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    # Dozens of vessel pieces share one clip shape (the liver): evaluate each clip shape once.
    clip_masks: dict[int, np.ndarray] = {}
    for layer in layers:
        region = grid.region(layer.shape.bounds())
        if region is None:
            continue
        p = grid.coords(region)
        inside = layer.shape.sdf(p) <= 0.0
        if layer.clip is not None:
            if id(layer.clip) not in clip_masks:
                clip_masks[id(layer.clip)] = _inside(layer.clip, grid)
            inside &= clip_masks[id(layer.clip)][region]
        values = np.broadcast_to(layer.tissue.values(p), inside.shape)
        hu[region][inside] = values[inside]
        labels[region][inside] = layer.label
    return hu, labels


def _check_geometry(size, spacing, direction) -> None:
    """Reject grids a user could ask for but that cannot hold a phantom."""
    if len(size) != 3 or min(size) < 2:
        raise DaregError(f"phantom size must be 3 voxel counts >= 2 (x, y, z), got {tuple(size)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise DaregError(
            f"phantom spacing must be 3 positive millimetre values (x, y, z), got {tuple(spacing)}"
        )
    matrix = np.asarray(direction, dtype=float)
    if matrix.size != 9 or not np.allclose(
        matrix.reshape(3, 3) @ matrix.reshape(3, 3).T, np.eye(3), atol=1e-6
    ):
        raise DaregError(
            "phantom direction must be a 3x3 orthonormal matrix (9 numbers, row-major as in ITK)"
        )


def make_phantom(
    *,
    size: tuple[int, int, int] = (96, 80, 64),
    spacing: tuple[float, float, float] = (2.5, 2.5, 3.0),
    seed: int = 0,
    origin: tuple[float, float, float] | None = None,
    direction: tuple[float, ...] | None = None,
) -> Phantom:
    """Procedural abdominal CT (contrast-enhanced, portal venous phase) with labels.

    Parameters
    ----------
    size, spacing : (x, y, z) voxels and mm, ITK order
        The default field of view is 240 x 200 x 192 mm, an upper abdomen.
    seed : int
        Decides the anatomy (shape variation, vessel trees, tumour) and the noise.
    origin : (x, y, z) LPS mm, optional
        Default: the field-of-view centre lies on the patient centre (0, 0, 0). The anatomy is fixed in
        physical space, so another origin moves the field of view, not the patient.
    direction : 9 numbers, row-major 3x3 (ITK), optional
        Direction cosines of the grid; an oblique direction rotates the sampling grid, not the patient.

    Returns
    -------
    Phantom
        Float32 HU image and uint8 labels (:data:`LABELS`) on the same grid. Labels are exact samples
        of the anatomy; the image is slightly blurred (partial volume) and has ~10 HU Gaussian noise.
    """
    direction = tuple(np.eye(3).ravel()) if direction is None else tuple(map(float, direction))
    _check_geometry(size, spacing, direction)
    matrix = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    if origin is None:
        origin = tuple(-matrix @ ((np.asarray(size, dtype=float) - 1.0) / 2.0))
    anatomy_seeds, noise_seeds = np.random.SeedSequence(seed).spawn(2)
    hu, labels = _render(_anatomy(anatomy_seeds), _Grid(size, spacing, origin, direction))
    hu = ndimage.gaussian_filter(hu, _BLUR_VOXELS)
    hu += np.random.default_rng(noise_seeds).normal(0.0, _NOISE_HU, size=hu.shape).astype(np.float32)
    image, label_image = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(labels)
    for img in (image, label_image):
        img.SetSpacing(tuple(map(float, spacing)))
        img.SetOrigin(tuple(map(float, origin)))
        img.SetDirection(direction)
    return Phantom(image=image, labels=label_image, names=dict(LABELS))


# ----------------------------------------------------------------------------------------------------
# Synthetic moving images with a known transform
# ----------------------------------------------------------------------------------------------------


def _check_volume(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DaregError(
            f"the {what} must be a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s); pass a single 3D volume"
        )


def _random_rigid(
    rng: np.random.Generator, image: sitk.Image, max_rotation_deg: float, max_translation_mm: float
) -> sitk.Euler3DTransform:
    """Rotation about the image centre (uniform angles per axis) and a uniform translation."""
    angles = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * max_rotation_deg)
    translation = rng.uniform(-1.0, 1.0, 3) * max_translation_mm
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(physical_corners(image).mean(axis=0)))
    rigid.SetRotation(*map(float, angles))
    rigid.SetTranslation(tuple(map(float, translation)))
    return rigid


def _max_displacement(transform: sitk.Transform, image: sitk.Image, step_mm: float) -> float:
    """Largest ``|T(x) - x|`` (mm) over a lattice with ``step_mm`` spacing spanning ``image``'s box."""
    extent = (np.asarray(image.GetSize(), dtype=float) - 1.0) * np.asarray(image.GetSpacing())
    size = np.ceil(extent / step_mm).astype(int) + 1
    # A 1-voxel axis has no extent; any positive spacing will do there.
    spacing = np.where(size > 1, extent / np.maximum(size - 1, 1), step_mm)
    field_image = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        size.tolist(),
        image.GetOrigin(),
        spacing.tolist(),
        image.GetDirection(),
    )
    return float(np.linalg.norm(sitk.GetArrayViewFromImage(field_image), axis=-1).max())


def _random_bspline(
    rng: np.random.Generator, image: sitk.Image, max_deformation_mm: float, control_spacing_mm: float
) -> sitk.BSplineTransform:
    """Cubic B-spline over ``image``'s domain, random coefficients, peak displacement = max_deformation_mm.

    The peak is measured on a lattice 1/12 of the control spacing apart: a cubic B-spline varies
    little over that distance, so the peak between lattice points exceeds it by well under 1%.
    """
    extent = np.asarray(image.GetSize(), dtype=float) * np.asarray(image.GetSpacing())
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(image, mesh, 3)
    coefficients = rng.normal(size=len(bspline.GetParameters()))
    bspline.SetParameters(tuple(map(float, coefficients)))
    peak = _max_displacement(bspline, image, control_spacing_mm / 12.0)
    scale = max_deformation_mm / peak if peak > 0 else 0.0
    bspline.SetParameters(tuple(map(float, coefficients * scale)))
    return bspline


def _draw_landmarks(
    rng: np.random.Generator, labels: sitk.Image, landmark_labels: tuple[int, ...], n_landmarks: int
) -> np.ndarray:
    """``n_landmarks`` voxel centres (N, 3) LPS mm inside ``landmark_labels``, spread over the region.

    Farthest-point selection among a random subset spreads the points over the whole organ, so the
    target registration error samples all of it rather than clusters.
    """
    if n_landmarks == 0:
        return np.zeros((0, 3))
    candidates = np.flatnonzero(np.isin(sitk.GetArrayViewFromImage(labels), landmark_labels))
    if candidates.size < n_landmarks:
        raise DaregError(
            f"only {candidates.size} voxels of labels {tuple(landmark_labels)} in the moving label map, "
            f"{n_landmarks} landmarks requested: pass landmark_labels present in the fixed labels "
            "(e.g. liver = 5 in TotalSegmentator maps, 1 in the phantom) or fewer landmarks"
        )
    subset = rng.choice(candidates, size=min(candidates.size, 50 * n_landmarks), replace=False)
    kji = np.stack(np.unravel_index(subset, sitk.GetArrayViewFromImage(labels).shape), axis=1)
    matrix, origin = index_to_physical_matrix(labels)
    points = kji[:, ::-1].astype(float) @ matrix.T + origin
    chosen = [0]
    nearest = np.linalg.norm(points - points[0], axis=1)
    for _ in range(n_landmarks - 1):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return points[chosen]


def make_synthetic_pair(
    fixed_image: sitk.Image,
    fixed_labels: sitk.Image,
    *,
    seed: int = 0,
    max_deformation_mm: float = 8.0,
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 10.0,
    control_spacing_mm: float = 40.0,
    n_landmarks: int = 20,
    landmark_labels: tuple[int, ...] = (1,),
    reference: sitk.Image | None = None,
    noise_hu: float = 10.0,
) -> SyntheticPair:
    """A moving image and labels made from a fixed image through a known random transform.

    ``S`` (moving -> fixed) = B-spline o rigid: the rigid part (Euler3D about the fixed image's centre,
    angles uniform in +-max_rotation_deg per axis, translation uniform in +-max_translation_mm per
    axis) is applied first, then a smooth B-spline over the fixed image's domain (mesh about
    ``control_spacing_mm``) whose largest displacement is ``max_deformation_mm``. So
    ``|S(y) - rigid(y)| <= max_deformation_mm`` everywhere.

    Parameters
    ----------
    fixed_image, fixed_labels : sitk.Image
        Any 3D scalar image (HU) and label map in the same physical space (grids may differ).
    seed : int
        Decides the transform, the noise and the landmarks (independent streams).
    n_landmarks, landmark_labels :
        Landmarks are moving voxel centres whose moving label is in ``landmark_labels`` (default the
        phantom's liver; 5 for TotalSegmentator; (2, 3) for the phantom's vessels).
    reference : sitk.Image, optional
        Defines the moving grid; default the fixed image's grid.
    noise_hu : float
        Standard deviation of the independent Gaussian noise added to the moving image.

    Returns
    -------
    SyntheticPair
        The moving image is float32 HU; outside the fixed image it takes the fixed image's minimum.
    """
    _check_volume(fixed_image, "fixed image")
    _check_volume(fixed_labels, "fixed label map")
    for name, value in (
        ("max_deformation_mm", max_deformation_mm),
        ("max_rotation_deg", max_rotation_deg),
        ("max_translation_mm", max_translation_mm),
        ("noise_hu", noise_hu),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if control_spacing_mm <= 0 or n_landmarks < 0:
        raise ValueError("control_spacing_mm must be > 0 and n_landmarks >= 0")
    transform_rng, noise_rng, landmark_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    rigid = _random_rigid(transform_rng, fixed_image, max_rotation_deg, max_translation_mm)
    bspline = _random_bspline(transform_rng, fixed_image, max_deformation_mm, control_spacing_mm)
    moving_to_fixed = sitk.CompositeTransform([bspline, rigid])  # the last one listed is applied first
    reference = fixed_image if reference is None else reference

    fixed_float = sitk.Cast(fixed_image, sitk.sitkFloat32)
    background = float(sitk.GetArrayViewFromImage(fixed_float).min())
    moving_image = resample_to_reference(
        fixed_float, reference, transform=moving_to_fixed, interpolation="linear", default_value=background
    )
    if noise_hu > 0:
        noisy = sitk.GetArrayFromImage(moving_image)
        noisy += noise_rng.normal(0.0, noise_hu, size=noisy.shape).astype(np.float32)
        noisy_image = sitk.GetImageFromArray(noisy)
        noisy_image.CopyInformation(moving_image)
        moving_image = noisy_image
    moving_labels = resample_to_reference(
        fixed_labels, reference, transform=moving_to_fixed, interpolation="nearest", default_value=0
    )
    moving_landmarks = _draw_landmarks(landmark_rng, moving_labels, tuple(landmark_labels), n_landmarks)
    fixed_landmarks = np.array(
        [moving_to_fixed.TransformPoint(tuple(map(float, p))) for p in moving_landmarks]
    )
    return SyntheticPair(
        moving_image=moving_image,
        moving_labels=moving_labels,
        moving_to_fixed=moving_to_fixed,
        fixed_landmarks=fixed_landmarks.reshape(-1, 3),
        moving_landmarks=moving_landmarks,
    )
