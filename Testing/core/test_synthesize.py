"""`ccella synthesize`: one synthetic exam per real exam, hashes instead of identifiers, resumable, torchrun-sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from CCELLACore.cli import main
from CCELLACore.data import LabelSource, read_manifest
from CCELLACore.data.volume import SYNTHETIC_KEY, read_volume
from CCELLACore.pipelines.synthesize_cli import synthetic_id

REPO = Path(__file__).resolve().parents[2]


def _args(data, trained, out, *extra):
    return ["synthesize", "--manifest", str(data / "prep" / "manifest.csv"), "--model", str(trained), "--out",
            str(out), "--steps", "2", "--splits", "val", "test", "--no-progress", *extra]


def test_one_synthetic_exam_per_real_exam_without_identifiers(data, trained, tmp_path):
    real = [s for s in read_manifest(data / "prep" / "manifest.csv").studies if s.split in ("val", "test")]
    out = tmp_path / "synth"
    assert main(_args(data, trained, out)) == 0
    synth = read_manifest(out / "manifest.csv", check_files=True)
    assert not synth.problems and len(synth) == len(real)
    assert {s.case_id for s in synth.studies} == {synthetic_id(s.case_id) for s in real}
    text = (out / "manifest.csv").read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in out.rglob("generation.json"))
    for study in real:
        assert study.case_id not in text and study.patient_id not in text
        if study.report:
            assert study.report[:30] not in text
    for study in synth.studies:
        assert study.label in (0, 1) and study.label_source == LabelSource.PREDICTED and study.report == ""
        assert read_volume(study.images["ADC"]).metadata[SYNTHETIC_KEY] == "true"
        record = json.loads((study.images["ADC"].parent / "generation.json").read_text(encoding="utf-8"))
        assert record["report"] is None and len(record["source_case_hash"]) == 20
        assert (record["source_report_hash"] is None) == record["unconditional"]


def test_rerun_skips_finished_exams_and_keep_report(data, trained, tmp_path):
    out = tmp_path / "synth"
    assert main(_args(data, trained, out)) == 0
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    victim = next(iter(first))
    (victim.parent / "generation.json").unlink()  # as if killed before this exam finished
    assert main(_args(data, trained, out)) == 0
    summary = json.loads((out / "synthesize_summary.json").read_text(encoding="utf-8"))
    assert summary["n_done"] == 1 and summary["n_reused"] == summary["n_synthetic"] - 1
    unchanged = [p for p, t in first.items() if p.parent != victim.parent]
    assert all(p.stat().st_mtime_ns == first[p] for p in unchanged)
    kept = tmp_path / "kept"
    assert main(_args(data, trained, kept, "--keep-report")) == 0
    reports = [s.report for s in read_manifest(kept / "manifest.csv").studies]
    assert any(reports)


def test_two_processes_give_the_same_exams_as_one(data, trained, tmp_path):
    # Bitwise equality holds only at equal thread counts (a 2-thread reduction sums in another order than a
    # 1-thread one, and AVX2 kernels show it): the single run and each torchrun process get one thread.
    single = tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = str(REPO / "Training" / "synthesize.py")
    one = subprocess.run([sys.executable, script, *_args(data, trained, single)[1:], "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           script, *_args(data, trained, tmp_path / "ddp")[1:], "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.relative_to(single) for p in single.rglob("*.nii.gz"))
    for volume in single.rglob("*.nii.gz"):
        twin = tmp_path / "ddp" / volume.relative_to(single)
        assert twin.read_bytes() == volume.read_bytes()


def test_sampling_defaults_come_from_the_model(data, trained, tmp_path):
    """Without --steps/--sampler/--guidance, synthesize uses the model's `sampling:` config (as generate does)."""
    import shutil

    import yaml

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    config = yaml.safe_load((model / "config.yaml").read_text(encoding="utf-8"))
    config["sampling"] = {"sampler": "ddim", "steps": 3, "guidance": 1.5}
    (model / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "synth"
    assert main(["synthesize", "--manifest", str(data / "prep" / "manifest.csv"), "--model", str(model), "--out",
                 str(out), "--splits", "test", "--no-progress"]) == 0
    records = [json.loads(p.read_text(encoding="utf-8")) for p in out.rglob("generation.json")]
    assert records and all((r["sampler"], r["steps"], r["guidance"]) == ("ddim", 3, 1.5) for r in records)
