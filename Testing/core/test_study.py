"""``ccella domain-adaptation`` with ``study_tiny.yaml`` on phantom Institutions 1 and 2: killed with SIGKILL after
its first cell and started again, it skips the finished cells, the cut cell ends as an uninterrupted run of it, and
the study ends with the table, statistics and figures; the
Institution-2 subsets are nested, stratified and per trial; bad configs and inputs give errors naming key, file or
case."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from CCELLACore.config import load_yaml
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.volume import read_volume, write_volume
from CCELLACore.errors import CCELLAError, ConfigError, DataError
from CCELLACore.fileio import read_json
from CCELLACore.study.config import load_study_config
from CCELLACore.study.runner import evaluate, plan_cells, prepare_data, run_study

REPO = Path(__file__).resolve().parents[2]


def _cell_in_training(out: Path) -> str | None:
    """Key of a cell that has a checkpoint but no result yet, once at least one cell has its result."""
    done = {p.relative_to(out / "cells").with_suffix("").as_posix() for p in (out / "cells").rglob("*.json")}
    if not done:
        return None
    for checkpoints in (out / "runs").rglob("checkpoints"):
        key = checkpoints.parent.relative_to(out / "runs").as_posix()
        if key not in done and any(checkpoints.glob("*/*.safetensors")):
            return key
    return None


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The tiny study, SIGKILLed in a subprocess after its first cell, while a later cell has a checkpoint but no
    result yet, then resumed in this process."""
    out = tmp_path_factory.mktemp("study_tiny")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = out.parent / "study_tiny_killed.log"  # a file, not a pipe: a full pipe would block the study
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "CCELLACore.cli", "domain-adaptation", "--config", "tiny",
                                 "--out", str(out), "--device", "cpu", "--no-progress"], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
        cut = None
        while proc.poll() is None and (cut := _cell_in_training(out)) is None:
            time.sleep(0.05)
    assert proc.poll() is None, f"the study ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    config = load_study_config("tiny")
    assert 1 <= len(before) < len(plan_cells(config))
    summary = run_study(config, out, device="cpu", progress=False)
    return {"out": out, "config": config, "summary": summary, "before": before, "cut": cut}


def test_the_cell_cut_by_the_kill_ends_as_an_uninterrupted_run_of_it(study, tmp_path):
    """The cell the kill cut (resumed from its checkpoint) against the same cell run from the start without a kill
    (a copy of the finished study with that cell's result and run removed): the same test scores."""
    out, config, cut = study["out"], study["config"], study["cut"]
    resumed = read_json(out / "cells" / f"{cut}.json")
    again = tmp_path / "study"
    shutil.copytree(out, again)
    (again / "cells" / f"{cut}.json").unlink()
    shutil.rmtree(again / "runs" / cut)
    run_study(config, again, device="cpu", progress=False)
    fresh = read_json(again / "cells" / f"{cut}.json")
    assert fresh["test"]["case_ids"] == resumed["test"]["case_ids"]
    np.testing.assert_allclose(fresh["test"]["scores"], resumed["test"]["scores"], rtol=0, atol=1e-5)
    assert (fresh["auc"], fresh["ap"]) == pytest.approx((resumed["auc"], resumed["ap"]), abs=1e-9)


def test_killed_study_resumes_and_writes_table_statistics_and_figures(study):
    out, config, summary = study["out"], study["config"], study["summary"]
    cells = plan_cells(config)
    assert summary["complete"] and summary["cells"] == len(cells) == 8  # 2 pretrain + 2 fractions x 3 strategies
    for path, mtime in study["before"].items():  # finished before the kill: skipped, not run again
        assert path.stat().st_mtime_ns == mtime
    test_ids = sorted(s.case_id for s in read_manifest(out / "data" / "phantoms2" / "manifest.csv").studies
                      if s.split == "test")
    for cell in cells:
        result = read_json(out / "cells" / f"{cell.key}.json")
        assert result["test"]["case_ids"] == test_ids and 0 <= result["ap"] <= 1 and 0 <= result["auc"] <= 1
        assert not (out / "runs" / cell.key / "checkpoints").exists()
        assert (out / "runs" / cell.key / "model").is_dir() == (cell.fraction == 0)  # pretrained models kept
        if cell.strategy in ("real", "synthetic") and cell.fraction > 0:
            assert result["initialised_from"] == f"runs/{cell.variant}/pretrain_{cell.strategy}/trial0/model"
    synthetic = read_manifest(out / "data" / "synthetic" / "manifest.csv").studies
    assert synthetic and all(s.label_source.value == "predicted" for s in synthetic)
    # Table: mean +- SD per variant, percent and strategy; 0 % only for the pretrained strategies.
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["variant"], r["percent"], r["strategy"]) for r in rows} == {
        ("bpmri", p, s) for p, s in
        [("0", "real"), ("0", "synthetic")] + [(p, s) for p in ("50", "100") for s in ("scratch", "real", "synthetic")]}
    assert all(float(r["ap_sd"]) == 0 for r in rows)  # one trial
    assert "0 % (zero-shot)" in (out / "table.md").read_text(encoding="utf-8")
    # Statistics: 3 pairs at 50 and 100 %, real vs synthetic at 0 %; p-values in (0, 1].
    stats = list(csv.DictReader((out / "statistics.csv").open()))
    assert len(stats) == 3 + 3 + 1
    for r in stats:
        assert 0 < float(r["auc_p_delong"]) <= 1 and 0 < float(r["ap_p_bootstrap"]) <= 1
    for name in summary["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["figures"] == ["figure_bpmri_ap.png", "figure_bpmri_auc.png"] and json.loads((out / "study.json").read_text())["complete"]
    # Running again does nothing but rewrite the report.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    run_study(config, out, device="cpu", progress=False)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    with pytest.raises(CCELLAError, match="another config"):  # never mixes two configs' cells
        run_study(replace(config, seed=1), out, device="cpu", progress=False)


def test_institution2_subsets_are_nested_stratified_and_keep_validation(study):
    out = study["out"]
    inst2 = read_manifest(out / "data" / "phantoms2" / "manifest.csv").studies
    pool = [s for s in inst2 if s.split == "train"]
    val = sorted(s.case_id for s in inst2 if s.split == "val")
    subsets = read_json(out / "subsets" / "trial0" / "subsets.json")
    assert sorted(subsets["100"]) == sorted(s.case_id for s in pool)
    assert set(subsets["50"]) < set(subsets["100"])
    label = {s.case_id: s.label for s in pool}
    for percent, fraction in (("50", 0.5), ("100", 1.0)):
        n_pos = sum(label[c] for c in subsets[percent])
        assert abs(n_pos - fraction * sum(label.values())) <= 1  # per-stratum rounding
        manifest = read_manifest(out / "subsets" / "trial0" / f"p{percent}.csv").studies
        assert sorted(s.case_id for s in manifest if s.split == "train") == sorted(subsets[percent])
        assert sorted(s.case_id for s in manifest if s.split == "val") == val


def test_test_exam_with_mismatched_geometry_is_named(study, tmp_path):
    out = study["out"]
    test = [s for s in read_manifest(out / "data" / "phantoms2" / "manifest.csv").studies if s.split == "test"]
    bad = test[0]
    highb = read_volume(bad.images["HighB"])
    moved = replace(highb, origin=tuple(o + 500.0 for o in highb.origin))  # no overlap with AxT2
    write_volume(moved, tmp_path / "highb.nii.gz")
    broken = [bad.with_paths({**bad.images, "HighB": tmp_path / "highb.nii.gz"})] + test[1:]
    model = out / "runs" / "bpmri" / "pretrain_real" / "trial0" / "model"
    with pytest.raises(DataError, match=bad.case_id):
        evaluate(model, broken, tmp_path / "cache", device="cpu")


def _config(tmp_path: Path, **changes) -> Path:
    data = load_yaml(REPO / "CCELLACore" / "configs" / "study_tiny.yaml")
    data.update(changes)
    path = tmp_path / "study.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("changes, key", [
    ({"fractions": [1.0, 1.5]}, None),
    ({"strategies": ["scratch", "real"]}, None),  # statistics.pairs name 'synthetic'
    ({"variants": {"bad": ["HighB"]}}, None),
    ({"trails": 3}, "trails"),
    ({"train": {"batch_size": 1}}, "train"),
    ({"data": {"institution1": "a.csv"}}, "data"),
])
def test_bad_configs_name_the_key_and_file(tmp_path, changes, key):
    path = _config(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert str(path) in str(info.value) and (key is None or key in str(info.value))


def test_missing_sequence_and_one_class_test_split_are_named(study, tmp_path):
    out = study["out"]
    inst1 = read_manifest(out / "data" / "phantoms1" / "manifest.csv").studies
    inst2 = read_manifest(out / "data" / "phantoms2" / "manifest.csv").studies
    write_manifest(inst1, tmp_path / "inst1.csv")
    victim = next(s for s in inst2 if s.split == "train")
    rows = [s.with_paths({"AxT2": s.images["AxT2"], "ADC": s.images["ADC"]}) if s is victim else s for s in inst2]
    write_manifest(rows, tmp_path / "inst2.csv")
    path = _config(tmp_path, data={"institution1": "inst1.csv", "institution2": "inst2.csv"},
                   synthetic={"manifest": str(out / "data" / "synthetic" / "manifest.csv")})
    with pytest.raises(DataError, match=rf"{victim.case_id}.*HighB.*bpmri"):
        prepare_data(load_study_config(path), tmp_path / "out", "cpu", False)
    one_class = [s for s in inst2 if s.split != "test" or s.label == 0]
    write_manifest(one_class, tmp_path / "inst2.csv")
    with pytest.raises(CCELLAError, match="both classes"):
        prepare_data(load_study_config(path), tmp_path / "out", "cpu", False)
