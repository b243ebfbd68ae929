"""Bad input (RELIABILITY.md, "Bad input"): each case gives an error naming the file, case or key, and nothing that
was already written changes. Cases covered elsewhere (truncated NIfTI/MHA, NaN/Inf, 2D/4D, missing sequence, no
overlap, YAML types and keys, a checkpoint from another config) are listed in RELIABILITY.md with their tests."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from CCELLACore.cli import main
from CCELLACore.data.layouts import export_layout, import_layout
from CCELLACore.data.manifest import read_manifest, write_manifest
from CCELLACore.data.preprocess import PreprocessConfig
from CCELLACore.data.preprocess_batch import preprocess_manifest
from CCELLACore.data.study import Study
from CCELLACore.data.volume import Volume, read_header, read_volume, write_volume
from CCELLACore.errors import CCELLAError, VolumeError
from CCELLACore.models.serialization import load_model_dir
from CCELLACore.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from CCELLACore.training.ema import EMA
from test_preprocess import GRID, make_exam_volumes, write_study


class Evil:
    """Unpickling this creates a marker file: proof that code in a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes and its mtime: equal snapshots = nothing changed."""
    return {str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _volume() -> Volume:
    return Volume(np.random.default_rng(0).uniform(0, 1, (9, 7, 5)).astype(np.float32), spacing=(1.0, 1.0, 3.0))


# --- images -------------------------------------------------------------------------------------------------------
def test_nrrd_truncation_wrong_headers_and_garbage_name_the_file(tmp_path):
    for compress in (False, True):
        path = write_volume(_volume(), tmp_path / f"cut{int(compress)}.nrrd", compress=compress)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        for read in (read_header, read_volume):  # the header check alone tells (what `import --check-images` runs)
            with pytest.raises(VolumeError, match=r"truncated: expected 1260 bytes of voxel data, found \d+") as err:
                read(path)
            assert str(path) in str(err.value)

    nrrd = tmp_path / "dims.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 7\nencoding: raw\n\n" + bytes(252))
    mha = tmp_path / "dims.mha"
    mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 9 7\nElementType = MET_FLOAT\n"
                    b"ElementDataFile = LOCAL\n" + bytes(252))
    expected = {nrrd: "NRRD header: sizes has 2 value(s) but dimension is 3",
                mha: "MetaImage header: DimSize has 2 value(s) but NDims is 3"}
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        garbage = tmp_path / f"garbage{suffix}"
        garbage.write_bytes(np.random.default_rng(1).bytes(700))
        expected[garbage] = "unreadable image"
    before = snapshot(tmp_path)
    for path, message in expected.items():
        with pytest.raises(VolumeError, match=re.escape(message)) as err:
            read_volume(path)
        assert str(err.value).startswith(str(path)) and "truncated" not in str(err.value)
    assert snapshot(tmp_path) == before  # reading never touches the input


def test_import_check_images_names_truncated_mha_and_nrrd(tmp_path):
    """A truncated PI-CAI-style .mha (and .nrrd) is found by `ccella import --check-images`, not only later."""
    studies = []
    for case_id, suffix in (("good", ".mha"), ("cutmha", ".mha"), ("cutnrrd", ".nrrd")):
        paths = {seq: write_volume(_volume(), tmp_path / "src" / case_id / f"{seq.lower()}{suffix}")
                 for seq in ("AxT2", "HighB", "ADC")}
        studies.append(Study(case_id=case_id, patient_id=f"p-{case_id}", images=paths))
    write_manifest(studies, tmp_path / "src" / "manifest.csv")
    for case_id in ("cutmha", "cutnrrd"):
        adc = next((tmp_path / "src" / case_id).glob("adc.*"))
        adc.write_bytes(adc.read_bytes()[:-300])
    before = snapshot(tmp_path / "src")
    out = tmp_path / "out" / "manifest.csv"
    assert main(["import", str(tmp_path / "src" / "manifest.csv"), "--out", str(out), "--check-images"]) == 0
    summary = json.loads(out.with_name("manifest.summary.json").read_text(encoding="utf-8"))
    reasons = {s["case_id"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"cutmha", "cutnrrd"}
    for case_id, name in (("cutmha", "adc.mha"), ("cutnrrd", "adc.nrrd")):
        assert f"{case_id}/{name}" in reasons[case_id] and "truncated: expected" in reasons[case_id]
        assert "No such file or directory" not in reasons[case_id]
    assert [s.case_id for s in read_manifest(out).studies] == ["good"]
    assert snapshot(tmp_path / "src") == before


def _shifted(volume: Volume, spacing) -> Volume:
    return Volume(volume.array, spacing, volume.origin, volume.direction)


def test_all_zero_and_absurd_spacing_volumes_are_named_and_finished_cases_stay(tmp_path):
    config = PreprocessConfig(grid=GRID)
    good = write_study(tmp_path, "good")
    out = tmp_path / "out"
    assert preprocess_manifest(write_manifest([good], tmp_path / "in" / "manifest.csv"), config, out, workers=1,
                               progress=False).done == ["good"]
    before = snapshot(out / "cases")
    bad = {}
    for case_id, key, change, reason in (
        ("zero_t2", "AxT2", lambda v: v.with_array(np.zeros_like(v.array)), "axt2.nii.gz: constant intensities"),
        ("zero_highb", "HighB", lambda v: v.with_array(np.zeros_like(v.array)), "highb.nii.gz: constant intensities"),
        ("micro", "AxT2", lambda v: _shifted(v, (1e-4, 1e-4, 3e-4)), "axt2.nii.gz: voxel spacing (0.0001, 0.0001"),
        ("huge", "ADC", lambda v: _shifted(v, (2e4, 2e4, 3e4)), "adc.nii.gz: voxel spacing (20000.0, 20000.0"),
    ):
        volumes = make_exam_volumes()
        volumes[key] = change(volumes[key])
        bad[case_id] = (write_study(tmp_path, case_id, volumes), reason)
    manifest = write_manifest([good, *(s for s, _ in bad.values())], tmp_path / "in" / "manifest.csv")
    summary = preprocess_manifest(manifest, config, out, workers=1, progress=False)
    assert summary.reused == ["good"] and summary.done == []
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert set(reasons) == set(bad)
    for case_id, (_, reason) in bad.items():
        assert reason in reasons[case_id], reasons[case_id]
    assert "outside 0.01-50.0 mm" in reasons["micro"]
    assert snapshot(out / "cases") == before
    assert not any((out / "cases" / case_id).exists() for case_id in bad)  # no half-written case folder


# --- manifests and reports ----------------------------------------------------------------------------------------
BAD_MANIFESTS = {
    "binary.csv": (np.random.default_rng(2).bytes(3000), "not valid UTF-8 at byte"),
    "latin1.csv": (b"case_id,patient_id,axt2,report\nc1,p1,a.nii.gz,PI-RADS \xb3 4\n", r"byte 54 \(line 2\)"),
    "utf16.csv": ("case_id,patient_id,axt2\nc1,p1,a.nii.gz\n".encode("utf-16"), "not valid UTF-8 at byte 0"),
    "quote.csv": (b'case_id,patient_id,axt2,report\nc1,p1,a.nii.gz,"PI-RADS 4\nc2,p2,b.nii.gz,x\n',
                  "row starting at line 2: unexpected end of data"),
    "huge.csv": (b"case_id,patient_id,axt2,report\nc1,p1,a.nii.gz," + b"x" * 200_000 + b"\n",
                 "row starting at line 2: field larger than field limit"),
    "columns.csv": (b"case_id,patient_id,axt2,lable\nc1,p1,a.nii.gz,1\n", "unknown column.*'lable'"),
}


def test_unreadable_manifests_stop_the_job_before_it_writes(tmp_path, capsys):
    good = write_study(tmp_path, "good")
    out = tmp_path / "out"
    argv = ["preprocess", "--config", "tiny", "--target", "ldm", "--out", str(out), "--workers", "1", "--no-progress"]
    assert main([*argv, "--manifest", str(write_manifest([good], tmp_path / "good.csv"))]) == 0
    before = snapshot(out)
    capsys.readouterr()
    for name, (data, message) in BAD_MANIFESTS.items():
        (tmp_path / name).write_bytes(data)
        assert main([*argv, "--manifest", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), (name, err)
        assert snapshot(out) == before, name


def test_bad_rows_are_named_by_case_and_line_and_the_rest_reads(tmp_path):
    """Binary garbage, a 100 000-character report, extra values and a duplicate id: row problems, others kept."""
    text = ("case_id,patient_id,axt2,report\n"
            "ok1,p1,a.nii.gz,\"PI-RADS 4, left PZ; ADC 650 µm²/s\"\n"
            "nul,p2,b.nii.gz,PI\x00RADS\x1b[2J\n"
            f"long,p3,c.nii.gz,{'x' * 100_000}\n"
            "commas,p4,d.nii.gz,PI-RADS 2, no lesion, benign\n"
            "ok1,p5,e.nii.gz,again\n"
            "ok2,p6,f.nii.gz,\n")
    path = tmp_path / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    manifest = read_manifest(path)
    assert [s.case_id for s in manifest.studies] == ["ok1", "ok2"]
    assert manifest.studies[0].report == "PI-RADS 4, left PZ; ADC 650 µm²/s"
    reasons = {p.case_id: p.reason for p in manifest.problems}
    assert set(reasons) == {"nul", "long", "commas", "ok1"}
    assert reasons["nul"].startswith("line 3 of manifest.csv") and "control character U+0000 at position 2" in \
        reasons["nul"]
    assert "line 4" in reasons["long"] and "100000 characters, above the limit of 20000" in reasons["long"]
    assert "line 5" in reasons["commas"] and "6 values for 4 columns" in reasons["commas"]
    assert "duplicate case_id (line 6" in reasons["ok1"]
    for reason in reasons.values():
        assert "PI" not in reason and "xxxxx" not in reason and "benign" not in reason  # no report text in errors
    # A spreadsheet's byte-order mark is not part of the first column's name.
    path.write_bytes(b"\xef\xbb\xbf" + text.split("\n", 1)[0].encode() + b"\nc1,p1,a.nii.gz,x\n")
    assert [s.case_id for s in read_manifest(path).studies] == ["c1"]


def test_paths_leaving_the_archive_root_are_not_read(tmp_path):
    rng = np.random.default_rng(3)
    studies = []
    for case_id in ("p0", "p1", "p2"):
        paths = {seq: write_volume(Volume(rng.uniform(0, 9, (6, 6, 4)).astype(np.float32)),
                                   tmp_path / "src" / case_id / f"{seq}.nii.gz") for seq in ("AxT2", "HighB", "ADC")}
        studies.append(Study(case_id=case_id, patient_id=case_id, images=paths, label=0, label_source="pirads"))
    root = export_layout(studies, "authors_json", tmp_path / "archive")
    outside = tmp_path / "secret" / "axt2.nii.gz"  # a real image outside the archive
    outside.parent.mkdir()
    shutil.copy(root / "p1" / "axt2.nii.gz", outside)
    entries = json.loads((root / "train.json").read_text(encoding="utf-8"))
    entries[1]["axt2"] = "../secret/axt2.nii.gz"
    entries[2]["axt2"] = str(outside)
    (root / "train.json").write_text(json.dumps(entries), encoding="utf-8")
    imported, summary = import_layout(root, check_images=True)
    assert [s.case_id for s in imported] == ["p0"]
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert set(reasons) == {"p1", "p2"}
    for reason in reasons.values():
        assert "train.json entry" in reason and "outside the data root" in reason and str(outside) in reason


# --- checkpoints and model folders --------------------------------------------------------------------------------
def _job(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    return TrainingState(models={"net": model}, optimizers={"adamw": torch.optim.AdamW(model.parameters())},
                         emas={"net": EMA(model, decay=0.9)}, config_hash="same")


def _values(state: TrainingState) -> list[torch.Tensor]:
    opt = state.optimizers["adamw"].state_dict()["state"]
    return [*state.models["net"].state_dict().values(), *state.emas["net"].shadow.values(),
            *(t for s in opt.values() for t in s.values())]


@pytest.mark.parametrize("name", ["models.safetensors", "ema.safetensors", "training.pt", "state.json"])
def test_truncated_checkpoint_names_the_file_and_changes_nothing(tmp_path, name):
    saved = _job(0)
    for step in (1, 2):
        saved.models["net"](torch.ones(1, 8)).sum().backward()
        saved.optimizers["adamw"].step()
        saved.emas["net"].update(saved.models["net"])
        saved.step = step
        save_checkpoint(tmp_path / "ckpt", saved)
    victim = tmp_path / "ckpt" / "last" / name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = snapshot(tmp_path / "ckpt")
    live = _job(7)
    was = [t.clone() for t in _values(live)]
    with pytest.raises(CCELLAError) as err:
        load_checkpoint(tmp_path / "ckpt", live)
    message = str(err.value)
    assert message.startswith(str(victim)) and f"{tmp_path / 'ckpt' / 'previous'} is complete" in message
    if name.endswith(".safetensors"):
        assert re.search(r"not a readable safetensors file \(truncated: expected \d+ bytes, found \d+\)", message)
    assert all(torch.equal(a, b) for a, b in zip(was, _values(live))) and live.step == 0
    assert snapshot(tmp_path / "ckpt") == before
    shutil.rmtree(tmp_path / "ckpt" / "last")  # what the message says to do: resume from `previous`
    assert load_checkpoint(tmp_path / "ckpt", live).name == "previous" and live.step == 1


def test_model_folder_extra_files_are_never_read(data, tmp_path, caplog):
    folder = tmp_path / "ae"
    shutil.copytree(data / "ae", folder)
    marker = tmp_path / "pwned"
    (folder / "autoencoder.pt").write_bytes(pickle.dumps(Evil(marker)))  # would create the marker if unpickled
    (folder / "notes.txt").write_text("extra", encoding="utf-8")
    shutil.copy(folder / "autoencoder.safetensors", folder / "old.safetensors")
    _, _, original = load_model_dir(data / "ae")
    with caplog.at_level("WARNING"):
        _, _, loaded = load_model_dir(folder)
    assert not marker.exists()
    assert all(torch.equal(original["autoencoder"][k], v) for k, v in loaded["autoencoder"].items())
    assert "['autoencoder.pt', 'notes.txt', 'old.safetensors'], not part of the model" in caplog.text
    (folder / "model.json").unlink()
    with pytest.raises(CCELLAError, match=r"model\.json: missing"):
        load_model_dir(folder)
