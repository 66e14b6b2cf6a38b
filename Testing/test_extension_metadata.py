"""The extension's metadata: CMakeLists.txt and the .s4ext say the same thing."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

CMAKE_TO_S4EXT = {
    "EXTENSION_HOMEPAGE": "homepage",
    "EXTENSION_CATEGORY": "category",
    "EXTENSION_CONTRIBUTORS": "contributors",
    "EXTENSION_DESCRIPTION": "description",
    "EXTENSION_ICONURL": "iconurl",
    "EXTENSION_SCREENSHOTURLS": "screenshoturls",
    "EXTENSION_DEPENDS": "depends",
}


def cmake_metadata() -> dict[str, str]:
    text = (REPO_ROOT / "CMakeLists.txt").read_text()
    return dict(re.findall(r'^set\((EXTENSION_\w+) "([^"]*)"\)', text, flags=re.MULTILINE))


def s4ext_metadata() -> dict[str, str]:
    entries = {}
    for line in (REPO_ROOT / "DeepAbdominalRegistration.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


def test_cmake_and_s4ext_agree():
    cmake, s4ext = cmake_metadata(), s4ext_metadata()
    assert set(CMAKE_TO_S4EXT) <= set(cmake), "CMakeLists.txt lacks extension metadata"
    for cmake_key, s4ext_key in CMAKE_TO_S4EXT.items():
        assert cmake[cmake_key] == s4ext[s4ext_key], f"{cmake_key} != .s4ext {s4ext_key}"
    assert s4ext["scmurl"].removesuffix(".git") == cmake["EXTENSION_HOMEPAGE"]


def test_project_name_matches_module_folder():
    text = (REPO_ROOT / "CMakeLists.txt").read_text()
    name = re.search(r"^project\((\w+)\)", text, flags=re.MULTILINE).group(1)
    assert (REPO_ROOT / name).is_dir() and (REPO_ROOT / f"{name}.s4ext").is_file()
