"""Headless 3D Slicer for the pytest suite: REAL MRML from slicer-core, minimal stand-ins for the rest.

3D Slicer itself cannot be installed here. PyPI's ``slicer-core`` provides the real MRML library
(scene, volume/segmentation/transform/table/layout nodes, storage nodes, segmentation and transform
logic) and ``slicer.util``; :func:`bootstrap` wires it up as the application would: ``slicer.mrmlScene``,
the segmentation converter rules, application/colour logic with the default colour tables, slice
orientation presets, a layout node with its layout logic, and ``slicer.modules.segmentations``.

slicer-core lacks the GUI application and the Qt layer. ONLY for those, this file installs stand-ins,
and only when the real module is absent:

- ``qt``, ``ctk``: empty modules. The module file imports them, but only its Widget uses them, and the
  Widget is never exercised here (nor is anything that needs a Qt event loop);
- ``slicer.app``: ``testingEnabled()`` (True, as under ctest), ``temporaryPath``, ``applicationName``;
- ``slicer.i18n``: ``tr`` / ``translate`` return the text unchanged;
- ``slicer.ScriptedLoadableModule``: the four base classes with what the module uses (``parent``
  attributes, the parameter-node singleton as the application creates it, ``delayDisplay`` -> log);
- ``slicer.parameterNodeWrapper``: ``parameterNodeWrapper`` stores each typed field in the real
  ``vtkMRMLScriptedModuleNode`` (MRML nodes as node references, str/int/float/bool as parameters,
  defaults written on wrapping, ``WithinRange`` enforced), with no GUI connection (``connectGui``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import tempfile
import types
import typing
import unittest
from pathlib import Path

import slicer

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_FOLDER = REPO_ROOT / "DeepAbdominalRegistration"
#: Stand-in for the application's home and temporary folders.
HEADLESS_HOME = Path(tempfile.gettempdir()) / "slicer-headless-stand-in"

_LOGICS: dict = {}  # scene -> the logics wired to it (kept alive as long as the scene is used)

_CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


# --------------------------------------------------------------------------------------------------
# Real MRML, wired as the application does it
# --------------------------------------------------------------------------------------------------


def new_scene():
    """A scene wired as the application wires its scene: colour tables, segmentation logic, slice
    orientation presets, a layout node with its layout logic. The logics stay alive with the scene."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        for rule in _CONVERTER_RULES:
            factory.RegisterConverterRule(getattr(slicer, rule)())
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    (HEADLESS_HOME / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)  # user colour files: none
    application_logic.SetHomeDirectory(str(HEADLESS_HOME))
    application_logic.SetShareDirectory("share")
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(application_logic)
    colors.SetMRMLScene(scene)
    application_logic.SetModuleLogic("Colors", colors)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_node = slicer.vtkMRMLLayoutNode()
    layout_node.SetSingletonTag("vtkMRMLLayoutNode")
    scene.AddNode(layout_node)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    _LOGICS[scene] = {"segmentations": segmentations, "others": (application_logic, colors, layout_logic)}
    return scene


def use_scene(scene) -> None:
    """Make ``scene`` (from :func:`new_scene`) the application scene: slicer.mrmlScene and the logics."""
    segmentations = _LOGICS[scene]["segmentations"]
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations))
    slicer.mrmlScene = scene


def bootstrap():
    """Install the stand-ins and an application scene, once; returns slicer.mrmlScene."""
    if getattr(slicer, "mrmlScene", None) is None:
        _install_stand_ins()
        use_scene(new_scene())
    return slicer.mrmlScene


_STORAGE_NODES = {
    "vtkMRMLScalarVolumeNode": "vtkMRMLVolumeArchetypeStorageNode",
    "vtkMRMLSegmentationNode": "vtkMRMLSegmentationStorageNode",
}


def load_node(path: Path, node_class: str):
    """A new scene node read from ``path`` by Slicer's storage node (what slicer.util.loadVolume and
    loadSegmentation do in the application, which slicer-core cannot start)."""
    node = slicer.mrmlScene.AddNewNodeByClass(node_class, path.name.split(".")[0])
    storage = getattr(slicer, _STORAGE_NODES[node_class])()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    node.CreateDefaultDisplayNodes()
    return node


def load_module():
    """Import DeepAbdominalRegistration.py (the module file) as Slicer would, after :func:`bootstrap`."""
    bootstrap()
    if str(MODULE_FOLDER) not in sys.path:
        sys.path.insert(0, str(MODULE_FOLDER))
    return importlib.import_module("DeepAbdominalRegistration")


# --------------------------------------------------------------------------------------------------
# Stand-ins for what slicer-core does not have (application, Qt, scripted-module framework)
# --------------------------------------------------------------------------------------------------


def _install_stand_ins() -> None:
    for name in ("qt", "ctk"):
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    if not hasattr(slicer, "app"):
        slicer.app = types.SimpleNamespace(
            testingEnabled=lambda: True,
            temporaryPath=str(HEADLESS_HOME / "temp"),
            applicationName="3D Slicer (stand-in)",
        )
    for name, module in (
        ("i18n", _i18n()),
        ("ScriptedLoadableModule", _scripted_loadable_module()),
        ("parameterNodeWrapper", _parameter_node_wrapper()),
    ):
        if f"slicer.{name}" not in sys.modules:
            sys.modules[f"slicer.{name}"] = module
            setattr(slicer, name, module)


def _i18n() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


def _scripted_loadable_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            """The module's singleton vtkMRMLScriptedModuleNode, created on first use (as in Slicer)."""
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, autoCloseMsec=1000) -> None:
            logging.info(message)

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    return module


class WithinRange:
    """Validator: ``minimum <= value <= maximum`` (ValueError otherwise)."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


def _to_text(value, kind) -> str:
    return ("true" if value else "false") if kind is bool else str(kind(value))


def _from_text(text: str, kind):
    return text == "true" if kind is bool else kind(text)


def _field_property(name: str, kind, validators: list):
    is_node = isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def get(self):
        if is_node:
            return self.parameterNode.GetNodeReference(name)
        return _from_text(self.parameterNode.GetParameter(name), kind)

    def set(self, value):
        if is_node:
            if value is not None and not value.IsA(kind.__name__):
                raise TypeError(f"{name} must be a {kind.__name__}, got {value.GetClassName()}")
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        for validator in validators:
            validator.validate(value)
        self.parameterNode.SetParameter(name, _to_text(value, kind))

    return property(get, set)


def _parameter_node_wrapper() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        """Typed fields of ``cls`` stored in a vtkMRMLScriptedModuleNode; defaults written when absent."""
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {}
        for name, hint in hints.items():
            kind, validators = hint, []
            if typing.get_origin(hint) is typing.Annotated:
                kind, *validators = typing.get_args(hint)
            fields[name] = (kind, validators, cls.__dict__.get(name))

        def __init__(self, parameterNode) -> None:
            self.parameterNode = parameterNode
            for name, (kind, _, default) in fields.items():
                is_node = isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)
                if not is_node and name not in parameterNode.GetParameterNames():
                    setattr(self, name, default)

        namespace = {"__init__": __init__, "__doc__": cls.__doc__, "_fields": fields}
        namespace.update({name: _field_property(name, *spec[:2]) for name, spec in fields.items()})
        return type(cls.__name__, (), namespace)

    module.parameterNodeWrapper = parameterNodeWrapper
    module.WithinRange = WithinRange
    return module
