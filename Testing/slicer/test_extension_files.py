"""The extension's description files, CMake lists, icon, UI and module file follow Slicer's rules.

Mirrors the checks of Slicer/ExtensionsIndex's CI (catalog entry schema v1.0.2, LF line endings, names) and of the
scripted-module template; nothing here imports Slicer, Qt or the module file (it is parsed with ``ast``).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from CCELLAPlusPlusLib import missing_requirements, read_requirements

REPO = Path(__file__).resolve().parents[2]
NAME = "CCELLAPlusPlus"
MODULE = REPO / NAME
ENTRY = REPO / f"{NAME}.json"
S4EXT = REPO / f"{NAME}.s4ext"
HOMEPAGE = "https://github.com/CCELLAPlusPlus/SlicerCCELLAPlusPlus"

ALLOWED_KEYS = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
    "enabled", "tier", "dicom_support_rule",
}
REQUIRED_KEYS = {"$schema", "category", "scm_url"}
S4EXT_KEYS = {
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
    "iconurl", "status", "description", "screenshoturls", "enabled",
}


def _entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def _s4ext() -> dict[str, str]:
    fields = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def _cmake_sets(path: Path) -> dict[str, str]:
    """``set(NAME "value")`` lines (each on one line, as the index's tooling expects)."""
    return dict(re.findall(r'^set\((EXTENSION_\w+) "([^"\n]*)"\)$', path.read_text(encoding="utf-8"), re.M))


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [item.replace("${MODULE_NAME}", NAME) for item in match.group(1).split()]


# --- Extensions Index entry -------------------------------------------------------------------------------------
def test_json_entry_follows_schema_v1_0_2():
    entry = _entry()
    assert set(entry) <= ALLOWED_KEYS, f"keys not allowed by the schema: {set(entry) - ALLOWED_KEYS}"
    assert REQUIRED_KEYS <= set(entry)
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == "Image Synthesis"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_revision"] == "main"
    assert entry.get("scm_type", "git") in ("git", "local")
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    assert isinstance(entry.get("enabled", True), bool)
    assert all(isinstance(entry[k], str) for k in ("$schema", "category", "scm_url", "scm_revision"))


def test_names_follow_index_rules():
    repository = _entry()["scm_url"].removesuffix(".git").rstrip("/").split("/")[-1]
    assert repository.startswith("Slicer") and repository == "SlicerCCELLAPlusPlus"
    assert not NAME.startswith("Slicer")
    assert _entry()["scm_url"].removesuffix(".git") == HOMEPAGE


@pytest.mark.parametrize("name", [f"{NAME}.json", f"{NAME}.s4ext", "CMakeLists.txt", f"{NAME}/CMakeLists.txt", "LICENSE"])
def test_lf_line_endings(name):
    data = (REPO / name).read_bytes()
    assert b"\r" not in data
    assert data.endswith(b"\n")


def test_s4ext_has_classic_fields_consistent_with_json_and_cmake():
    fields = _s4ext()
    assert S4EXT_KEYS <= set(fields), f"missing: {S4EXT_KEYS - set(fields)}"
    entry, sets = _entry(), _cmake_sets(REPO / "CMakeLists.txt")
    assert fields["scm"] == "git"
    assert fields["scmurl"] == entry["scm_url"]
    assert fields["scmrevision"] == entry["scm_revision"]
    assert fields["depends"].split() == entry["build_dependencies"] == sets["EXTENSION_DEPENDS"].split()
    assert fields["category"] == entry["category"] == sets["EXTENSION_CATEGORY"]
    assert fields["homepage"] == sets["EXTENSION_HOMEPAGE"] == HOMEPAGE
    assert fields["contributors"] == sets["EXTENSION_CONTRIBUTORS"] == "CCELLAPlusPlus developers"
    assert fields["iconurl"] == sets["EXTENSION_ICONURL"]
    assert fields["screenshoturls"] == sets["EXTENSION_SCREENSHOTURLS"]
    assert fields["description"] == sets["EXTENSION_DESCRIPTION"]
    assert fields["enabled"] in ("0", "1")


# --- CMake ------------------------------------------------------------------------------------------------------
def test_top_level_cmakelists():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r"^project\((\w+)\)", text, re.M) == [ENTRY.stem]
    sets = _cmake_sets(REPO / "CMakeLists.txt")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert sets.get(f"EXTENSION_{key}"), f"EXTENSION_{key} missing or not on one line"
    for url in (sets["EXTENSION_ICONURL"], *sets["EXTENSION_SCREENSHOTURLS"].split()):
        assert url.startswith("https://raw.githubusercontent.com/CCELLAPlusPlus/SlicerCCELLAPlusPlus/main/")
        assert url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))  # never SVG
    for url in (sets["EXTENSION_ICONURL"], *sets["EXTENSION_SCREENSHOTURLS"].split()):
        path = REPO / url.split("/main/", 1)[1]
        assert path.is_file(), f"{url} points to a file that is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    order = [
        "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", f"add_subdirectory({NAME})",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)


def test_ccellacore_is_installed_next_to_scripted_modules():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "CCELLACore/*.py" in text and "CCELLACore/configs/*.yaml" in text and "CCELLACore/demo_model/*" in text
    assert "CCELLACore/demo_classifier/*" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text
    # Data files the globs do not cover would be missing in Slicer.
    uncovered = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "CCELLACore").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"
        and not (p.parent == REPO / "CCELLACore" / "configs" and p.suffix == ".yaml")
        and p.parent not in (REPO / "CCELLACore" / "demo_model", REPO / "CCELLACore" / "demo_classifier")
    ]
    assert not uncovered, f"add these to CCELLACore_PYTHON_RESOURCES in CMakeLists.txt: {uncovered}"


def test_module_cmakelists_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"set\(MODULE_NAME {NAME}\)", text)
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = sorted(p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    assert sorted(resources) == sorted(p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file())
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


# --- icon -------------------------------------------------------------------------------------------------------
def test_icon_is_a_valid_128px_png():
    data = (MODULE / "Resources" / "Icons" / f"{NAME}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, kinds = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            assert struct.unpack(">II", body[:8]) == (128, 128)
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    import imageio.v3 as iio

    pixels = iio.imread(data, extension=".png")
    assert pixels.shape[:2] == (128, 128) and pixels.std() > 10  # decodes to a real picture, not a flat fill


# --- module file and UI -----------------------------------------------------------------------------------------
def _module_tree() -> ast.Module:
    return ast.parse((MODULE / f"{NAME}.py").read_text(encoding="utf-8"))


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def test_module_file_has_template_classes():
    classes = _classes(_module_tree())
    expected_bases = {
        NAME: {"ScriptedLoadableModule"},
        f"{NAME}Widget": {"ScriptedLoadableModuleWidget", "VTKObservationMixin"},
        f"{NAME}Logic": {"JobSceneLogic", "ScriptedLoadableModuleLogic"},
        f"{NAME}Test": {"ScriptedLoadableModuleTest"},
    }
    for name, bases in expected_bases.items():
        assert name in classes, f"class {name} missing"
        assert {ast.unparse(b) for b in classes[name].bases} == bases
    methods = {n.name for n in classes[f"{NAME}Logic"].body if isinstance(n, ast.FunctionDef)}
    assert {"ensureDependencies", "generate", "classify"} <= methods
    widget_methods = {n.name for n in classes[f"{NAME}Widget"].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "cleanup"} <= widget_methods
    test_methods = {n.name for n in classes[f"{NAME}Test"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(m.startswith("test_") for m in test_methods)


def test_logic_never_touches_widgets():
    logic = _classes(_module_tree())[f"{NAME}Logic"]
    source = ast.unparse(logic)
    assert "self.ui" not in source and "qt." not in source


@pytest.mark.parametrize("path", [MODULE / f"{NAME}.py", *sorted((MODULE / f"{NAME}Lib").glob("*.py")),
                                  *sorted((REPO / "CCELLACore" / "jobs").glob("*.py"))], ids=lambda p: p.name)
def test_file_scope_imports_are_allowed_ones(path):
    """Third-party packages are imported on use, never at file scope (Slicer's review rule); torch never."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"slicer", "vtk", "qt", "ctk", "numpy", "CCELLAPlusPlusLib", "CCELLACore"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # relative imports stay in the package
            names = [node.module or ""]
        for name in names:
            assert not name or name.split(".")[0] in allowed, f"{path.name}: file-scope import of {name}"
    assert "\nimport torch" not in path.read_text(encoding="utf-8")


def _ui() -> ET.Element:
    return ET.parse(MODULE / "Resources" / "UI" / f"{NAME}.ui").getroot()


#: The .ui uses standard Qt widgets only, so that PySide6's QUiLoader builds the same panel in the tests.
STANDARD_WIDGETS = {
    "QWidget", "QTabWidget", "QGroupBox", "QLabel", "QComboBox", "QPushButton", "QPlainTextEdit", "QLineEdit",
    "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QProgressBar", "QListWidget",
}
PANEL = MODULE / f"{NAME}Lib" / "panel.py"


def test_ui_uses_standard_qt_widgets_only():
    root = _ui()
    assert root.find("widget").get("class") == "QWidget"
    assert not list(root.iter("customwidget")), "custom (Slicer-only) widgets belong in the thin Slicer layer"
    assert {w.get("class") for w in root.iter("widget")} <= STANDARD_WIDGETS


def test_ui_widgets_used_by_the_panel_exist():
    names = {w.get("name") for w in _ui().iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", PANEL.read_text(encoding="utf-8")))
    used |= set(re.findall(r'\("(\w+(?:Button|CheckBox|GroupBox))"', PANEL.read_text(encoding="utf-8")))
    assert used and used <= names, f"not in the .ui: {used - names}"


def test_every_button_does_something():
    source = PANEL.read_text(encoding="utf-8")
    buttons = [w.get("name") for w in _ui().iter("widget") if w.get("class") == "QPushButton"]
    assert len(buttons) >= 10
    for name in buttons:
        assert re.search(rf'\("{name}", self\.\w+\)', source), f"{name} is not connected"


# --- dependencies -----------------------------------------------------------------------------------------------
def test_requirements_use_ranges_and_never_torch():
    from packaging.requirements import Requirement

    lines = read_requirements(MODULE / "Resources" / "requirements.txt")
    assert len(lines) >= 5
    names = set()
    for line in lines:
        requirement = Requirement(line)
        names.add(requirement.name.lower())
        assert all(spec.operator != "==" for spec in requirement.specifier), f"exact pin: {line}"
        assert all(spec.operator == ">=" for spec in requirement.specifier), f"lower bounds only: {line}"
    assert not names & {"torch", "torchvision", "simpleitk", "numpy", "scipy", "vtk"}  # PyTorchUtils / Slicer own these
    # Everything CCELLACore needs besides those: inside Slicer nothing else installs it.
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = {Requirement(d).name.lower() for d in project["dependencies"]}
    assert needed - {"torch", "simpleitk", "numpy", "scipy"} <= names, "add to Resources/requirements.txt"


def test_missing_requirements_reads_installed_versions(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.0\n\nnumpy>=9999  # too new\n--prefer-binary\nccella-no-such-package>=1\n")
    lines = read_requirements(requirements)
    assert lines == ["numpy>=1.0", "numpy>=9999", "ccella-no-such-package>=1"]
    assert missing_requirements(lines) == ["numpy>=9999", "ccella-no-such-package>=1"]
    assert missing_requirements([f"numpy=={np.__version__}"]) == []


def test_protected_constraints_pin_what_is_installed():
    from CCELLAPlusPlusLib import protected_constraints

    assert protected_constraints(["numpy", "ccella-no-such-package"]) == [f"numpy=={np.__version__}"]
