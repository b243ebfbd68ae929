"""The `ccella` command: every job listed, Training/ scripts wrap the same jobs, errors are one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from CCELLACore.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_job(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom CCELLACore.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ccella" in result.stdout and result.stderr.strip() == "False"


def test_every_job_module_has_the_interface():
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_training_scripts_wrap_registered_jobs():
    scripts = sorted(p for p in (REPO / "Training").glob("*.py") if not p.name.startswith("_"))
    assert scripts
    for script in scripts:
        job = re.search(r'run\("([^"]+)"\)', script.read_text(encoding="utf-8")).group(1)
        assert job in COMMANDS, script.name
    result = subprocess.run([sys.executable, str(REPO / "Training" / "preprocess.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--manifest" in result.stdout


def test_errors_are_one_line_naming_the_file(tmp_path, capsys):
    assert main(["preprocess", "--manifest", str(tmp_path / "none.csv"), "--config", "tiny", "--target", "ldm",
                 "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "none.csv" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  ldm:\n    grid:\n      sise: [1, 2, 3]\n", encoding="utf-8")
    (tmp_path / "m.csv").write_text("case_id,patient_id,axt2\n", encoding="utf-8")
    assert main(["preprocess", "--manifest", str(tmp_path / "m.csv"), "--config", str(bad), "--target", "ldm",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "preprocess.ldm.grid.sise" in err and "bad.yaml" in err
