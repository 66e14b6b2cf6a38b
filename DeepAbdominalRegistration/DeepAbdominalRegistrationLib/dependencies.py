"""Python packages the engine needs inside 3D Slicer: what is missing, and installing it after asking.

Checked on the first Register only, never at import: versions are read with ``importlib.metadata``
without importing anything (importing a package would keep its old version loaded until a restart).
The requirement list is ``Resources/requirements.txt``.

Three rules protect Slicer's own Python:

- numpy, scipy and SimpleITK ship with Slicer (:data:`HOST_PACKAGES`): any installed version is
  accepted, and a constraints file pins the installed versions so pip never replaces them.
- antspyx declares ``numpy<2.4`` and ``scipy<1.16`` while Slicer 5.12 ships numpy 2.4 and scipy 1.17:
  it is installed with ``--no-deps``, its other dependencies (:data:`NO_DEPS_PIECES`) normally.
- TensorFlow has several distributions (``tensorflow``, ``tensorflow-cpu``...); any one of them
  satisfies a requirement on another, so a GPU build already installed is never joined by a second.

In testing mode (``slicer.app.testingEnabled()``) nothing is installed: :func:`ensure` raises instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HOST_PACKAGES = frozenset({"numpy", "scipy", "simpleitk"})
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel")
#: Needed only for the ANTs SyN comparison.
ANTS_PACKAGES = frozenset({"antspyx"})
#: Installed with --no-deps, followed by these dependencies (antspyx 0.6.3's, minus numpy and scipy).
NO_DEPS_PIECES: dict[str, tuple[str, ...]] = {
    "antspyx": (
        "pandas",
        "pyyaml",
        "statsmodels",
        "webcolors",
        "matplotlib",
        "pillow",
        "requests",
        "scikit-learn",
    )
}

VersionLookup = Callable[[str], "str | None"]


class DependencyError(RuntimeError):
    """Packages are missing and cannot (or may not) be installed; the message lists them."""


class Outcome(IntEnum):
    """What :func:`ensure` did."""

    READY = 0  # nothing was missing
    DECLINED = 1  # the user said no; nothing installed
    INSTALLED = 2  # installed; usable at once (the engine runs in a new process)
    RESTART_NEEDED = 3  # installed, but a replaced package was already imported in Slicer


@dataclass(frozen=True)
class Missing:
    """A requirement that is not satisfied, and the version found (None: not installed)."""

    requirement: Requirement
    installed: str | None

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def pip_argument(self) -> str:
        """``name<specifier>`` without the environment marker (already evaluated for this platform)."""
        return f"{self.requirement.name}{self.requirement.specifier}"

    def describe(self) -> str:
        found = f"{self.installed} installed" if self.installed else "not installed"
        return f"{self.pip_argument} ({found})"


def read_requirements(path: Path) -> list[Requirement]:
    """Requirements of a requirements.txt file (comments and blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#", 1)[0]) for line in lines if line.split("#", 1)[0].strip()]


def installed_version(name: str) -> str | None:
    """Version of the installed distribution ``name``, or None (read from metadata, nothing imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _candidates(name: str) -> tuple[str, ...]:
    return TENSORFLOW_DISTRIBUTIONS if name in TENSORFLOW_DISTRIBUTIONS else (name,)


def missing_requirements(
    requirements: Iterable[Requirement], *, with_ants: bool, version_of: VersionLookup = installed_version
) -> list[Missing]:
    """The requirements that apply here (markers, ANTs wanted or not) and are not satisfied."""
    missing = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if name in ANTS_PACKAGES and not with_ants:
            continue
        found = [v for v in (version_of(c) for c in _candidates(name)) if v is not None]
        if name in HOST_PACKAGES and found:
            continue
        if not any(requirement.specifier.contains(v, prereleases=True) for v in found):
            missing.append(Missing(requirement, found[0] if found else None))
    return missing


def constraints_text(version_of: VersionLookup = installed_version) -> str:
    """A pip constraints file pinning Slicer's own numpy/scipy/SimpleITK to the installed versions."""
    pins = [f"{name}=={version_of(name)}" for name in sorted(HOST_PACKAGES) if version_of(name)]
    return "".join(f"{pin}\n" for pin in pins)


def pip_commands(missing: list[Missing], constraints_file: Path | None = None) -> list[list[str]]:
    """``pip install`` argument lists: one resolution for the ordinary packages (plus the pieces of the
    no-deps packages), then each no-deps package on its own with ``--no-deps``."""
    no_deps = [m for m in missing if m.name in NO_DEPS_PIECES]
    ordinary = [m.pip_argument for m in missing if m.name not in NO_DEPS_PIECES]
    ordinary += [piece for m in no_deps for piece in NO_DEPS_PIECES[m.name] if piece not in ordinary]
    constraints = ["-c", str(constraints_file)] if constraints_file is not None else []
    commands = [ordinary + constraints] if ordinary else []
    commands += [[m.pip_argument, "--no-deps"] for m in no_deps]
    return commands


def restart_needed(missing: list[Missing], loaded_modules: Iterable[str]) -> bool:
    """True if a package that was replaced (not newly installed) is imported in this process."""
    distributions = importlib.metadata.packages_distributions()
    loaded = {
        canonicalize_name(dist)
        for module in loaded_modules
        for dist in distributions.get(module.partition(".")[0], [])
    }
    return any(m.installed is not None and m.name in loaded for m in missing)


def confirmation_text(missing: list[Missing]) -> tuple[str, str]:
    """The question and the detailed package list for the one confirmation dialog."""
    question = (
        f"Deep Abdominal Registration needs {len(missing)} Python package(s) that are not installed in "
        "3D Slicer yet (TensorFlow alone is about 300 MB). Install them now? This can take several "
        "minutes; Slicer's own numpy, scipy and SimpleITK are not changed."
    )
    return question, "\n".join(m.describe() for m in missing)


def ensure(
    requirements_path: Path,
    *,
    with_ants: bool,
    confirm: Callable[[str, str], bool],
    install: Callable[[list[str]], object],
    testing: bool,
    loaded_modules: Mapping[str, object] | None = None,
) -> Outcome:
    """Check the requirements; if some are missing, ask once (``confirm(question, details)``) and install.

    ``install`` receives one ``pip install`` argument list at a time (``slicer.util.pip_install`` in
    Slicer). Raises :class:`DependencyError` in testing mode or if packages are still missing after
    installing.
    """
    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements, with_ants=with_ants)
    if not missing:
        return Outcome.READY
    listing = "\n".join(m.describe() for m in missing)
    if testing:
        raise DependencyError(f"Python packages are missing (never installed in testing mode):\n{listing}")
    if not confirm(*confirmation_text(missing)):
        return Outcome.DECLINED
    with tempfile.TemporaryDirectory(prefix="DeepAbdominalRegistration-pip-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(constraints_text(), encoding="utf-8")
        for arguments in pip_commands(missing, constraints):
            install(arguments)
    importlib.invalidate_caches()
    still = missing_requirements(requirements, with_ants=with_ants)
    if still:
        raise DependencyError(
            "Installation finished, but these packages are still missing:\n"
            + "\n".join(m.describe() for m in still)
        )
    loaded = sys.modules if loaded_modules is None else loaded_modules
    return Outcome.RESTART_NEEDED if restart_needed(missing, loaded) else Outcome.INSTALLED
