"""The module panel renders from its .ui and fits Slicer's module panel tidily.

Stand-in: 3D Slicer cannot be installed here, so ``render_ui`` draws the Slicer/CTK widgets of the
.ui (qMRMLNodeComboBox, ctkCollapsibleButton, qMRMLTableView, qMRMLWidget) with the plain Qt classes
that look like them (render_ui.QT_STAND_INS); everything else is the real .ui, loaded by PySide6's
QUiLoader off-screen. Skipped when PySide6 (the `dev` extra) is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PySide6.QtUiTools", reason="PySide6 (pip install PySide6-Essentials) is missing")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

from render_ui import MODULE_UI, PANEL_WIDTH, main, plain_qt_ui, render_panel  # noqa: E402

#: Narrowest useful field: a node name such as "CT abdomen (follow-up)" must be readable.
MIN_FIELD_WIDTH = 180


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    png = tmp_path_factory.mktemp("render") / "panel.png"
    panel = render_panel(png)
    yield panel, png
    panel.close()


def _pixels(png) -> np.ndarray:
    image = QtGui.QImage(str(png)).convertToFormat(QtGui.QImage.Format.Format_RGBA8888)
    return np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.width(), 4).copy()


def _rect_in(panel: QtWidgets.QWidget, widget: QtWidgets.QWidget) -> QtCore.QRect:
    return QtCore.QRect(widget.mapTo(panel, QtCore.QPoint(0, 0)), widget.size())


def test_png_is_a_whole_panel_not_a_blank_image(rendered):
    panel, png = rendered
    pixels = _pixels(png)
    assert pixels.shape[1] == PANEL_WIDTH and 500 <= pixels.shape[0] <= 1400, pixels.shape
    colours = np.unique(pixels.reshape(-1, 4), axis=0)
    assert len(colours) > 50, "the PNG looks blank"
    dark = (pixels[..., :3].mean(axis=2) < 100).mean()
    assert 0.005 < dark < 0.2, f"fraction of dark (text) pixels {dark:.3f}"


def test_panel_fits_the_module_panel_width(rendered):
    panel, _ = rendered
    assert panel.minimumSizeHint().width() <= PANEL_WIDTH


def test_every_parameter_widget_is_visible_wide_and_inside_the_panel(rendered):
    panel, _ = rendered
    bound = [w for w in panel.findChildren(QtWidgets.QWidget) if w.property("SlicerParameterName")]
    assert len(bound) == 14
    for widget in bound:
        name = widget.property("SlicerParameterName")
        assert widget.isVisible(), name
        assert widget.width() >= MIN_FIELD_WIDTH, f"{name} is {widget.width()} px wide"
        assert panel.rect().contains(_rect_in(panel, widget)), f"{name} is clipped"


def test_register_button_is_prominent_and_log_starts_collapsed(rendered):
    panel, _ = rendered
    button = panel.findChild(QtWidgets.QPushButton, "registerButton")
    assert button.isVisible() and button.font().bold()
    assert button.width() >= 0.9 * PANEL_WIDTH - 40 and button.height() >= 32
    assert not panel.findChild(QtWidgets.QPlainTextEdit, "logTextEdit").isVisible()
    assert panel.findChild(QtWidgets.QTableView, "resultsTableView").isVisible()


def test_node_selectors_show_what_slicer_shows_in_an_empty_scene(rendered):
    panel, _ = rendered
    texts = {
        name: panel.findChild(QtWidgets.QComboBox, name).currentText()
        for name in ("fixedVolumeSelector", "fixedSegmentationSelector", "outputVolumeSelector")
    }
    assert texts == {
        "fixedVolumeSelector": "",
        "fixedSegmentationSelector": "None (images only)",
        "outputVolumeSelector": "(create new volume)",
    }


def test_an_unknown_slicer_widget_is_reported_not_drawn_blank():
    ui = MODULE_UI.read_text(encoding="utf-8").replace("qMRMLTableView", "qMRMLSegmentsTableView")
    with pytest.raises(ValueError, match="qMRMLSegmentsTableView"):
        plain_qt_ui(ui)


def test_main_writes_the_screenshot_where_asked(tmp_path):
    out = tmp_path / "shot.png"
    assert main(["--out", str(out)]) == 0
    assert QtGui.QImage(str(out)).width() == PANEL_WIDTH
