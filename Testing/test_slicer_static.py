"""Static checks of the Slicer module: CMake lists, the panel's .ui, the icon, requirements.txt.

None of this needs Slicer: files are compared with the files on disk (both ways, so new files are
noticed), the .ui is parsed as XML, and the ParameterNode class of DeepAbdominalRegistration.py is
read with ``ast`` (not imported).
"""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT

MODULE_NAME = "DeepAbdominalRegistration"
MODULE_DIR = REPO_ROOT / MODULE_NAME
MODULE_SCRIPT = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png"
EXTENSION_ICON = REPO_ROOT / "Resources" / f"{MODULE_NAME}.png"
SCREENSHOT = REPO_ROOT / "Resources" / "Screenshot01.png"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"

SCENE_SIGNAL = "mrmlSceneChanged(vtkMRMLScene*)"
SCENE_SLOT = "setMRMLScene(vtkMRMLScene*)"

#: Node selectors of the contract: parameter -> (noneEnabled, addEnabled).
NODE_SELECTOR_FLAGS = {
    "fixedVolume": (False, False),
    "movingVolume": (False, False),
    "fixedSegmentation": (True, False),
    "movingSegmentation": (True, False),
    "outputTransform": (True, True),
    "outputVolume": (True, True),
    "outputSegmentation": (True, True),
}

#: Widgets the Widget class drives by name: objectName -> class.
FIXED_WIDGETS = {
    "registerButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultsCollapsibleButton": "ctkCollapsibleButton",
    "resultsTableView": "qMRMLTableView",
    "showCompareLayoutButton": "QPushButton",
    "logCollapsibleButton": "ctkCollapsibleButton",
    "logTextEdit": "QPlainTextEdit",
}

#: Python type of a parameter -> widget classes parameterNodeWrapper can bind it to.
WIDGETS_FOR_TYPE = {
    "str": {"QLineEdit", "QComboBox"},
    "int": {"QSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox"},
}

#: Qt's (minimum, maximum) of a numeric widget whose .ui leaves them out.
QT_DEFAULT_RANGES = {
    "QSpinBox": ("0", "99"),
    "QDoubleSpinBox": ("0", "99.99"),
    "ctkSliderWidget": ("0", "99"),
}

#: Packages 3D Slicer ships itself: requirements.txt keeps only their lower bounds.
SLICER_BUNDLED = {"numpy", "scipy", "simpleitk"}

#: pyproject requirement -> the distribution that replaces it on macOS.
MACOS_SUBSTITUTES = {"tensorflow-cpu": "tensorflow"}


# --------------------------------------------------------------------------- CMake


def cmake_variables(text: str) -> dict[str, list[str]]:
    """Every ``set(NAME item ...)`` of a CMake file, with ``${VAR}`` expanded (lists splice in)."""
    variables: dict[str, list[str]] = {}
    text = re.sub(r"#[^\n]*", "", text)
    for name, body in re.findall(r"\bset\(\s*(\w+)\s+([^)]*)\)", text):
        variables[name] = [item for token in body.split() for item in _expand(token, variables)]
    return variables


def _expand(token: str, variables: dict[str, list[str]]) -> list[str]:
    whole = re.fullmatch(r"\$\{(\w+)\}", token)
    if whole:
        return variables[whole.group(1)]
    return [re.sub(r"\$\{(\w+)\}", lambda match: ";".join(variables[match.group(1)]), token)]


def _is_shipped(relative: Path) -> bool:
    """Files of the module folder that the installed extension needs (not build files or caches)."""
    hidden_or_build = any(
        part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info") for part in relative.parts
    )
    return not (
        hidden_or_build
        or relative.parts[0] == "Testing"
        or relative == Path("CMakeLists.txt")
        or relative.suffix == ".pyc"
    )


def files_on_disk() -> tuple[set[str], set[str]]:
    """(Python scripts, resources) of the module folder, relative POSIX paths."""
    scripts, resources = set(), set()
    for path in MODULE_DIR.rglob("*"):
        relative = path.relative_to(MODULE_DIR)
        if path.is_file() and _is_shipped(relative):
            (scripts if path.suffix == ".py" else resources).add(relative.as_posix())
    return scripts, resources


@pytest.fixture(scope="module")
def module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def _difference_message(kind: str, listed: set[str], on_disk: set[str]) -> str:
    return (
        f"{kind}: on disk but not in CMakeLists.txt {sorted(on_disk - listed)}; "
        f"listed but missing {sorted(listed - on_disk)}"
    )


def test_cmake_lists_every_script_and_resource_and_nothing_else(module_cmake):
    variables = cmake_variables(module_cmake)
    scripts, resources = files_on_disk()
    listed_scripts = set(variables["MODULE_PYTHON_SCRIPTS"])
    listed_resources = set(variables["MODULE_PYTHON_RESOURCES"])
    assert listed_scripts == scripts, _difference_message("scripts", listed_scripts, scripts)
    assert listed_resources == resources, _difference_message("resources", listed_resources, resources)
    assert len(variables["MODULE_PYTHON_SCRIPTS"]) == len(listed_scripts), "a script is listed twice"


def test_cmake_ships_the_module_the_engine_and_the_panel(module_cmake):
    variables = cmake_variables(module_cmake)
    scripts = set(variables["MODULE_PYTHON_SCRIPTS"])
    assert variables["MODULE_NAME"] == [MODULE_NAME]
    assert {f"{MODULE_NAME}.py", f"{MODULE_NAME}Lib/__init__.py", "dareg/__main__.py"} <= scripts
    assert {
        f"Resources/UI/{MODULE_NAME}.ui",
        f"Resources/Icons/{MODULE_NAME}.png",
        "Resources/requirements.txt",
    } <= set(variables["MODULE_PYTHON_RESOURCES"])


def test_cmake_builds_the_module_and_registers_its_tests(module_cmake):
    compact = " ".join(re.sub(r"#[^\n]*", "", module_cmake).split())
    assert (
        "slicerMacroBuildScriptedModule( NAME ${MODULE_NAME} SCRIPTS ${MODULE_PYTHON_SCRIPTS} "
        "RESOURCES ${MODULE_PYTHON_RESOURCES} WITH_GENERIC_TESTS )" in compact
    )
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in compact
    assert "add_subdirectory(Testing)" in compact
    testing = MODULE_DIR / "Testing"
    assert "add_subdirectory(Python)" in (testing / "CMakeLists.txt").read_text(encoding="utf-8")
    assert (testing / "Python" / "CMakeLists.txt").is_file()


def test_top_level_cmake_adds_the_module_before_the_next_module_marker():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    added = text.index(f"add_subdirectory({MODULE_NAME})")
    assert added < text.index("## NEXT_MODULE") < text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})")
    assert text.index("include(${Slicer_USE_FILE})") < added


# --------------------------------------------------------------------------- the .ui


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _property(element: ET.Element, name: str) -> ET.Element | None:
    """The value element (<string>, <bool>, ...) of a widget's own property, or None."""
    prop = element.find(f"property[@name='{name}']")
    return None if prop is None else prop[0]


def _text(element: ET.Element, name: str, default: str | None = None) -> str | None:
    value = _property(element, name)
    return default if value is None else (value.text or "")


def _widgets(ui: ET.Element) -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in ui.iter("widget")}


def bound_widgets(ui: ET.Element) -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    bound: dict[str, ET.Element] = {}
    for widget in ui.iter("widget"):
        prop = widget.find("property[@name='SlicerParameterName']")
        if prop is not None:
            assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be dynamic"
            name = prop[0].text
            assert name not in bound, f"{name} is bound to two widgets"
            bound[name] = widget
    return bound


def _annotation_name(node: ast.expr) -> str:
    """``X``, ``slicer.X``, ``Annotated[X, ...]``, ``Optional[X]`` and ``X | None`` -> "X"."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.BinOp) and isinstance(node.right, ast.Constant) and node.right.value is None:
        return _annotation_name(node.left)
    if isinstance(node, ast.Subscript) and _annotation_name(node.value) in ("Annotated", "Optional"):
        inner = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        return _annotation_name(inner)
    raise ValueError(f"unsupported annotation {ast.unparse(node)}")


def _within_range(node: ast.expr) -> tuple[float, float] | None:
    """The bounds of ``Annotated[..., WithinRange(lo, hi)]``, if any."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple):
        for extra in node.slice.elts[1:]:
            if isinstance(extra, ast.Call) and _annotation_name(extra.func) == "WithinRange":
                low, high = (ast.literal_eval(arg) for arg in extra.args)
                return float(low), float(high)
    return None


def parameter_node_fields(source: str) -> dict[str, ast.AnnAssign]:
    """The typed fields of the one ``@parameterNodeWrapper`` class in ``source``."""
    classes = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
        and any(
            _annotation_name(getattr(d, "func", d)) == "parameterNodeWrapper" for d in node.decorator_list
        )
    ]
    assert len(classes) == 1, f"expected one @parameterNodeWrapper class, found {len(classes)}"
    return {
        field.target.id: field
        for field in classes[0].body
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
    }


@pytest.fixture(scope="module")
def fields() -> dict[str, ast.AnnAssign]:
    return parameter_node_fields(MODULE_SCRIPT.read_text(encoding="utf-8"))


def test_ui_top_level_is_a_qmrmlwidget_named_after_the_module(ui):
    top = ui.find("widget")
    assert (top.get("class"), top.get("name"), ui.findtext("class")) == (
        "qMRMLWidget",
        MODULE_NAME,
        MODULE_NAME,
    )


def test_ui_object_names_are_unique(ui):
    names = [widget.get("name") for widget in ui.iter("widget")]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


def test_every_parameter_is_bound_to_one_widget_and_every_binding_is_a_parameter(ui, fields):
    assert set(bound_widgets(ui)) == set(fields)


def test_widget_classes_and_defaults_match_the_parameter_types(ui, fields):
    for name, widget in bound_widgets(ui).items():
        field = fields[name]
        type_name = _annotation_name(field.annotation)
        widget_class = widget.get("class")
        if type_name.startswith("vtkMRML"):
            assert widget_class == "qMRMLNodeComboBox", name
            assert [s.text for s in _property(widget, "nodeTypes")] == [type_name], name
            continue
        assert widget_class in WIDGETS_FOR_TYPE[type_name], f"{name}: {type_name} shown in a {widget_class}"
        default = ast.literal_eval(field.value) if field.value is not None else None
        assert _widget_value(widget) == default, (
            f"{name}: .ui shows {_widget_value(widget)!r}, default {default!r}"
        )
        bounds = _within_range(field.annotation)
        if bounds is not None:
            low, high = QT_DEFAULT_RANGES[widget_class]
            assert (float(_text(widget, "minimum", low)), float(_text(widget, "maximum", high))) == bounds, (
                name
            )


def _widget_value(widget: ET.Element) -> object:
    """What the widget shows before the parameter node is connected."""
    widget_class = widget.get("class")
    if widget_class == "QComboBox":
        return widget.find("item/property[@name='text']/string").text
    if widget_class == "QLineEdit":
        return _text(widget, "text", "")
    if widget_class == "QCheckBox":
        return _text(widget, "checked", "false") == "true"
    if widget_class == "QSpinBox":
        return int(_text(widget, "value", "0"))
    return float(_text(widget, "value", "0"))


def test_node_selectors_offer_none_and_create_as_the_contract_says(ui):
    bound = bound_widgets(ui)
    for name, (none_enabled, add_enabled) in NODE_SELECTOR_FLAGS.items():
        widget = bound[name]
        flags = (
            _text(widget, "noneEnabled", "false") == "true",
            _text(widget, "addEnabled", "false") == "true",
        )
        assert flags == (none_enabled, add_enabled), f"{name}: (noneEnabled, addEnabled) = {flags}"
        assert _text(widget, "removeEnabled") == "false", f"{name}: removing a node from the panel loses data"


def test_every_mrml_widget_gets_the_scene(ui):
    top = ui.find("widget").get("name")
    mrml_widgets = {
        w.get("name") for w in ui.find("widget").iter("widget") if w.get("class").startswith("qMRML")
    }
    mrml_widgets.discard(top)
    connected = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if (c.findtext("sender"), c.findtext("signal"), c.findtext("slot")) == (top, SCENE_SIGNAL, SCENE_SLOT)
    }
    assert connected == mrml_widgets


def test_custom_widgets_are_declared(ui):
    used = {w.get("class") for w in ui.iter("widget") if not w.get("class").startswith("Q")}
    declared = {cw.findtext("class") for cw in ui.iter("customwidget")}
    assert used == declared


def test_panel_sections_and_the_widgets_the_module_drives(ui):
    top_layout = ui.find("widget/layout")
    sections = [w for w in top_layout.findall("item/widget") if w.get("class") == "ctkCollapsibleButton"]
    assert [_text(s, "text") for s in sections] == ["Inputs", "Method", "Outputs", "Results", "Log"]
    widgets = _widgets(ui)
    assert {name: widgets[name].get("class") for name in FIXED_WIDGETS} == FIXED_WIDGETS
    assert _text(widgets["registerButton"], "text") == "Register"
    assert _text(widgets["logCollapsibleButton"], "collapsed") == "true"
    assert _text(widgets["logTextEdit"], "readOnly") == "true"
    assert widgets["logTextEdit"] in widgets["logCollapsibleButton"].iter("widget")
    results = list(widgets["resultsCollapsibleButton"].iter("widget"))
    assert widgets["resultsTableView"] in results and widgets["showCompareLayoutButton"] in results


def test_parameter_names_and_choice_values_are_not_translated(ui):
    """Translating "auto" or "model" in the .ui would change the value the parameter node stores."""
    for name, widget in bound_widgets(ui).items():
        untranslated = [widget.find("property[@name='SlicerParameterName']/string")]
        untranslated += widget.findall("item/property[@name='text']/string")
        assert all(s.get("notr") == "true" for s in untranslated), f'{name}: mark with notr="true"'


def test_every_input_and_button_explains_itself(ui):
    widgets = _widgets(ui)
    explained = [*bound_widgets(ui).values(), widgets["registerButton"], widgets["showCompareLayoutButton"]]
    missing = [w.get("name") for w in explained if not (_text(w, "toolTip") or "").strip()]
    assert not missing, f"widgets without a tooltip: {missing}"


def test_parameter_node_reader_understands_the_annotation_forms():
    source = (
        "@parameterNodeWrapper\n"
        "class P:\n"
        "    a: slicer.vtkMRMLScalarVolumeNode\n"
        "    b: Annotated[float, WithinRange(0, 100)] = 40.0\n"
        "    c: Optional[vtkMRMLSegmentationNode] = None\n"
        "    d: vtkMRMLTransformNode | None\n"
        "class Other:\n"
        "    e: int = 1\n"
    )
    fields = parameter_node_fields(source)
    assert {name: _annotation_name(f.annotation) for name, f in fields.items()} == {
        "a": "vtkMRMLScalarVolumeNode",
        "b": "float",
        "c": "vtkMRMLSegmentationNode",
        "d": "vtkMRMLTransformNode",
    }
    assert _within_range(fields["b"].annotation) == (0.0, 100.0)


# --------------------------------------------------------------------------- icon and screenshot


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icon_is_128_px_and_the_extension_icon_is_the_same_file():
    assert _png_size(ICON) == (128, 128)
    assert EXTENSION_ICON.read_bytes() == ICON.read_bytes()


def test_readme_screenshot_is_a_panel_sized_png():
    """Resources/Screenshot01.png (README, extension metadata) is written by Testing/render_ui.py."""
    width, height = _png_size(SCREENSHOT)
    assert 300 <= width <= 600 and height > width


# --------------------------------------------------------------------------- requirements.txt


def requirements_file() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line]


def pyproject_runtime_requirements() -> list[Requirement]:
    """[project] dependencies + the `cpu` (TensorFlow) and `ants` extras: what Slicer's Python needs."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return [Requirement(text) for text in [*project["dependencies"], *extras["cpu"], *extras["ants"]]]


def _without_upper_bounds(specifier: SpecifierSet) -> SpecifierSet:
    return SpecifierSet(",".join(str(s) for s in specifier if s.operator not in ("<", "<=")))


def test_requirements_txt_mirrors_pyproject():
    listed: dict[str, list[Requirement]] = {}
    for requirement in requirements_file():
        listed.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    expected_names = set()
    for wanted in pyproject_runtime_requirements():
        name = canonicalize_name(wanted.name)
        specifier = _without_upper_bounds(wanted.specifier) if name in SLICER_BUNDLED else wanted.specifier
        for variant in (name, MACOS_SUBSTITUTES.get(name)):
            if variant is not None:
                expected_names.add(variant)
                found = [str(r.specifier) for r in listed.get(variant, [])]
                assert found == [str(specifier)], f"{variant}: requirements.txt {found}, expected {specifier}"
    assert set(listed) == expected_names, f"not in pyproject.toml: {sorted(set(listed) - expected_names)}"


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_requirements_txt_installs_exactly_one_tensorflow(platform):
    active = {
        canonicalize_name(r.name)
        for r in requirements_file()
        if r.marker is None or r.marker.evaluate({"sys_platform": platform})
    }
    assert len(active & {"tensorflow", "tensorflow-cpu"}) == 1, active
