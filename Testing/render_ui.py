"""Draw the module panel from its .ui with plain PySide6: the README screenshot and its test.

3D Slicer cannot be installed here, so the Slicer/CTK widget classes of the .ui (qMRMLNodeComboBox,
ctkCollapsibleButton, ...) are replaced, in a copy of the XML, by the Qt classes that look like them;
layouts, texts, tooltips, sizes and defaults are the real .ui. By hand::

    .venv/bin/python Testing/render_ui.py            # writes Resources/Screenshot01.png
"""

from __future__ import annotations

import argparse
import functools
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from PySide6 import QtCore, QtWidgets
from PySide6.QtUiTools import QUiLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_UI = REPO_ROOT / "DeepAbdominalRegistration" / "Resources" / "UI" / "DeepAbdominalRegistration.ui"
SCREENSHOT = REPO_ROOT / "Resources" / "Screenshot01.png"

#: Width of Slicer's module panel on a typical screen (px); the panel must fit it without scrolling.
PANEL_WIDTH = 420

#: Slicer/CTK class -> the Qt class drawn in its place.
QT_STAND_INS = {
    "qMRMLWidget": QtWidgets.QWidget,
    "ctkCollapsibleButton": QtWidgets.QGroupBox,
    "qMRMLNodeComboBox": QtWidgets.QComboBox,
    "qMRMLTableView": QtWidgets.QTableView,
    "ctkPathLineEdit": QtWidgets.QLineEdit,
    "ctkSliderWidget": QtWidgets.QDoubleSpinBox,
}

#: Dynamic property that keeps the Slicer class name on its stand-in.
SLICER_CLASS = "slicerClass"


def plain_qt_ui(ui_text: str) -> bytes:
    """The .ui XML with every Slicer/CTK widget replaced by its Qt stand-in.

    Properties the stand-in lacks (``nodeTypes``, ``collapsed``...) become dynamic properties, so
    QUiLoader keeps them without warnings; the custom-widget declarations and the
    ``mrmlSceneChanged`` connections (signals plain Qt widgets lack) are dropped.
    Raises ValueError for a custom class with no stand-in, so a new Slicer widget is noticed here.
    """
    root = ET.fromstring(ui_text)
    for element in root.iter("widget"):
        slicer_class = element.get("class")
        if slicer_class in QT_STAND_INS:
            _replace_class(element, QT_STAND_INS[slicer_class])
        elif not hasattr(QtWidgets, slicer_class):
            raise ValueError(
                f"no Qt stand-in for the Slicer widget class {slicer_class}; add it to QT_STAND_INS"
            )
    for section in ("customwidgets", "connections"):
        for child in root.findall(section):
            root.remove(child)
    return ET.tostring(root, encoding="utf-8")


def _replace_class(element: ET.Element, stand_in: type[QtWidgets.QWidget]) -> None:
    meta = stand_in.staticMetaObject
    for prop in element.findall("property"):
        if meta.indexOfProperty(prop.get("name")) < 0:
            prop.set("stdset", "0")
    marker = ET.SubElement(element, "property", {"name": SLICER_CLASS, "stdset": "0"})
    ET.SubElement(marker, "string").text = element.get("class")
    element.set("class", stand_in.__name__)


@functools.cache
def qt_application() -> QtWidgets.QApplication:
    """One QApplication per process (off-screen unless QT_QPA_PLATFORM says otherwise), Fusion style."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")
    return app


def load_panel(ui_path: Path = MODULE_UI) -> QtWidgets.QWidget:
    """The panel as plain Qt widgets, showing what Slicer shows with an empty scene."""
    qt_application()
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(plain_qt_ui(Path(ui_path).read_text(encoding="utf-8"))))
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise ValueError(f"QUiLoader could not load {ui_path}")
    for group in panel.findChildren(QtWidgets.QGroupBox):
        _show_as_collapsible(group)
    for combo in panel.findChildren(QtWidgets.QComboBox):
        if combo.property(SLICER_CLASS) == "qMRMLNodeComboBox" and combo.property("noneEnabled"):
            combo.addItem(combo.property("noneDisplay") or "None")
    return panel


def _show_as_collapsible(group: QtWidgets.QGroupBox) -> None:
    """A group box drawn like ctkCollapsibleButton: an arrow in the title; collapsed = title only."""
    collapsed = bool(group.property("collapsed"))
    group.setTitle(("\u25b8 " if collapsed else "\u25be ") + group.property("text"))
    if collapsed:
        group.setStyleSheet("QGroupBox { border: none; }")
        for child in group.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.hide()


def render_panel(png_path: Path, ui_path: Path = MODULE_UI, width: int = PANEL_WIDTH) -> QtWidgets.QWidget:
    """Lay the panel out at ``width`` px, its natural height, and save it as PNG; returns the panel."""
    app = qt_application()
    panel = load_panel(ui_path)
    panel.resize(width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(png_path)):
        raise OSError(f"could not write {png_path}")
    return panel


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ui", type=Path, default=MODULE_UI, help="the .ui file")
    parser.add_argument("--out", type=Path, default=SCREENSHOT, help="PNG to write")
    parser.add_argument("--width", type=int, default=PANEL_WIDTH, help="panel width (px)")
    args = parser.parse_args(argv)
    render_panel(args.out, args.ui, args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
