"""Bundled models: model folders shipped inside the package, and resolving a user's model choice.

Layout: ``dareg/models/bundled/<name>/`` (each a model folder, see ``modelio``) and optionally
``dareg/models/bundled/index.json`` = ``{"ranking": ["best", "second", ...]}``; the default model is
the first ranked name that is actually bundled. TensorFlow-free, so the Slicer GUI can list models.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DaregError
from .config import CONFIG_FILE

BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
INDEX_FILE = "index.json"


def list_bundled_models(root: Path = BUNDLED_ROOT) -> dict[str, Path]:
    """Bundled model names -> folders (sub-folders of ``root`` holding a config.json; hidden ones skipped)."""
    if not root.is_dir():
        return {}
    return {
        path.name: path
        for path in sorted(root.iterdir())
        if path.is_dir() and not path.name.startswith(".") and (path / CONFIG_FILE).is_file()
    }


def _ranking(root: Path) -> list[str]:
    path = root / INDEX_FILE
    if not path.is_file():
        return []
    try:
        ranking = json.loads(path.read_text(encoding="utf-8")).get("ranking", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise DaregError(
            f"The bundled model index {path} is unreadable ({error}); reinstall dareg."
        ) from None
    if not isinstance(ranking, list) or not all(isinstance(name, str) for name in ranking):
        raise DaregError(f"The bundled model index {path} must hold a list of model names; reinstall dareg.")
    return ranking


def default_model_name(root: Path = BUNDLED_ROOT) -> str | None:
    """The best bundled model per ``index.json``'s ranking, or None (no index, or none of it bundled)."""
    bundled = list_bundled_models(root)
    return next((name for name in _ranking(root) if name in bundled), None)


def resolve_model(spec: str | Path | None, root: Path = BUNDLED_ROOT) -> Path | None:
    """Turn a user's model choice into a model folder, or None for "no model".

    Parameters
    ----------
    spec : None or "default" -> the default bundled model (None when none is bundled);
        "none" -> None (run without a network); a bundled model name -> its folder;
        a path to an existing model folder -> that path.
    root : folder of the bundled models.

    Raises
    ------
    DaregError
        Anything else, with the bundled names and what a path must be.
    """
    bundled = list_bundled_models(root)
    if spec is None or spec == "default":
        name = default_model_name(root)
        return None if name is None else bundled[name]
    if spec == "none":
        return None
    if isinstance(spec, str) and spec in bundled:
        return bundled[spec]
    path = Path(spec).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return path
    if path.is_dir():
        problem = f"Model folder {str(path)!r} holds no {CONFIG_FILE}, so it is not a dareg model folder."
    else:
        problem = f"Model {str(spec)!r} is neither a bundled model name nor an existing model folder."
    raise DaregError(
        f"{problem} Bundled models: {', '.join(sorted(bundled)) or 'none'}. A path must be a model folder "
        f"holding {CONFIG_FILE}, model.weights.h5 and manifest.json; 'default' picks the best bundled model "
        "and 'none' runs without a network."
    )
