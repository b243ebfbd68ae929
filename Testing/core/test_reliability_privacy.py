"""Privacy (RELIABILITY.md): a full run (preprocess -> train-ldm -> synthesize) with distinctive reports and patient
ids, at ``--verbose`` (DEBUG, ours and every library's), writes none of them to stdout, stderr, the log or any log,
metrics or summary file; synthetic outputs carry the
synthetic mark and none of the source's identifiers."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.preprocess import case_folder_name
from CCELLACore.data.volume import SYNTHETIC_KEY, read_metadata

# Data files hold reports and identifiers by design (the data set itself, encoded reports, weights, images).
DATA_FILES = ("raw/manifest.csv", "prep/manifest.csv")
DATA_SUFFIXES = (".nii.gz", ".safetensors", ".pt")


def test_full_run_logs_no_report_text_or_patient_id(data, tmp_path, capfd, caplog):
    source = read_manifest(data / "phantoms" / "manifest.csv").studies
    studies = [replace(s, patient_id=f"PATIENTZQ{k:03d}", report=f"{s.report} Quetzalmarker{k:03d} noted.")
               for k, s in enumerate(source)]
    secrets = [s.patient_id for s in studies] + [f"Quetzalmarker{k:03d}" for k in range(len(studies))]
    secrets += [s.report[:40] for s in source if s.report]  # the phantom report text itself
    out = tmp_path  # the raw manifest points to the phantom images where they are: only ids and reports are new
    # One corrupt image: the skipped case is reported (by case id and file), its report and patient id are not.
    (out / "corrupt.nii.gz").write_bytes(b"not a volume")
    studies[0] = replace(studies[0], images={**studies[0].images, "AxT2": out / "corrupt.nii.gz"})
    # One unexpected (non-data) failure: a file where the case's output folder goes; its DEBUG traceback is logged.
    blocked = next(s for s in studies[1:] if s.split != "test")
    (out / "prep" / "cases").mkdir(parents=True)
    (out / "prep" / "cases" / case_folder_name(blocked.case_id)).write_bytes(b"")
    raw = write_manifest(studies, out / "raw" / "manifest.csv")
    with caplog.at_level(logging.DEBUG):  # what --verbose shows: the default (INFO) shows a part of it
        assert main(["-v", "preprocess", "--manifest", str(raw), "--config", "tiny", "--target", "ldm", "--out",
                     str(out / "prep"), "--workers", "1", "--no-progress"]) == 1  # 1: a case was skipped
        assert main(["-v", "train-ldm", "--config", "tiny", "--manifest", str(out / "prep" / "manifest.csv"),
                     "--autoencoder", str(data / "ae"), "--out", str(out / "run"), "--max-steps", "2",
                     "--device", "cpu", "--no-progress"]) == 0
        assert main(["-v", "synthesize", "--manifest", str(out / "prep" / "manifest.csv"), "--model",
                     str(out / "run" / "model"), "--out", str(out / "synth"), "--splits", "test", "--steps", "1",
                     "--device", "cpu", "--no-progress"]) == 0
    printed = capfd.readouterr()
    said = printed.out + printed.err + caplog.text
    assert "synthetic exams" in printed.out and "train-ldm" in said  # the jobs did speak
    assert f"skipped case {studies[0].case_id}" in said and "corrupt.nii.gz" in said
    assert f"case {blocked.case_id} failed" in caplog.text and "Traceback" in caplog.text  # the DEBUG record
    assert f"skipped case {blocked.case_id}: unexpected" in said
    for secret in secrets:
        assert secret not in said, secret

    written = [p for p in out.rglob("*") if p.is_file() and str(p.relative_to(out)) not in DATA_FILES
               and not p.name.endswith(DATA_SUFFIXES) and "cache" not in p.relative_to(out).parts]
    names = {p.name for p in written}
    assert {"metrics.csv", "preprocess_summary.json", "synthesize_summary.json", "model.json", "README.md",
            "manifest.csv", "generation.json"} <= names, names
    for path in written:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode("utf-8") not in content, (path, secret)

    # Synthetic outputs: marked synthetic, named by hashes, none of the source's ids (case or patient).
    synth = read_manifest(out / "synth" / "manifest.csv", check_files=True)
    test_cases = [s for s in studies if s.split == "test"]
    assert len(synth) == len(test_cases) > 0 and not synth.problems
    synthetic_text = (out / "synth" / "manifest.csv").read_text(encoding="utf-8")
    for study in test_cases:
        assert study.case_id not in synthetic_text and study.patient_id not in synthetic_text
    for study in synth.studies:
        assert study.case_id.startswith("syn_") and study.patient_id.startswith("syn_") and study.report == ""
        record = json.loads((study.images["AxT2"].parent / "generation.json").read_text(encoding="utf-8"))
        assert record["synthetic"] is True and record["report"] is None
        for path in study.images.values():
            header = read_metadata(path)
            assert header[SYNTHETIC_KEY] == "true" and "SYNTHETIC" in header["ITK_FileNotes"]
            assert not any(s.case_id in v or s.patient_id in v for s in studies for v in header.values())
