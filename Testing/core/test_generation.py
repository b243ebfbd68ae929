"""train-ldm and generation end to end on tiny configs: loss, resume, determinism, reports, bad inputs (DDP: see
test_reliability_distributed.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.cli import main
from CCELLACore.data import read_volume
from CCELLACore.data.volume import SYNTHETIC_KEY
from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.pipelines.generation import CCELLAPipeline
from CCELLACore.precision import unet_memory_format
from CCELLACore.reports import ReportError
from CCELLACore.settings import load_config
from CCELLACore.training.ldm import train_ldm


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "ldm.safetensors"))


def _metrics(run: Path) -> list[dict[str, str]]:
    import csv

    with (run / "metrics.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_training_writes_model_metrics_and_checkpoint(trained):
    run = trained.parent
    rows = _metrics(run)
    train_rows = [r for r in rows if r.get("train_total")]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["train_total"])) for r in train_rows)
    lrs = [float(r["lr"]) for r in train_rows]  # the LR each step used: 1e-3 * (1 - s / 6) ** 2
    np.testing.assert_allclose(lrs, [1e-3 * (1 - s / 6) ** 2 for s in range(6)], rtol=1e-6)
    assert any(r.get("val_total") for r in rows)
    meta = json.loads((trained / "model.json").read_text())
    assert meta["sequences"] == ["AxT2", "HighB", "ADC"] and meta["objective"] == "epsilon"
    assert set(meta["latent_scale_factors"]) == {"AxT2", "HighB", "ADC"}
    assert meta["reference_intensities"]["ADC"] == 3000.0 and meta["reference_intensities"]["AxT2"] > 0
    assert (run / "checkpoints" / "last" / "state.json").is_file()


def test_killed_run_resumes_exactly(data, trained, tmp_path):
    """3 steps, stop, start the same job again for 6 in all == 6 steps uninterrupted (bit for bit)."""
    run = tmp_path / "run"
    config = load_config("tiny")
    assert train_ldm(config, data / "prep" / "manifest.csv", data / "ae", run, device="cpu", stop_after=3,
                     progress=False) is None
    resumed = train_ldm(config, data / "prep" / "manifest.csv", data / "ae", run, device="cpu", progress=False)
    full, again = _weights(trained), _weights(resumed)
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert [int(r["step"]) for r in _metrics(run) if r.get("train_total")] == [1, 2, 3, 4, 5, 6]


def test_loss_falls(data, tmp_path):
    config = load_config("tiny")
    config = replace(config, train_ldm=replace(config.train_ldm, max_steps=40, batch_size=4, lr=1e-2,
                                               condition_dropout=0.0, validate_every=5, checkpoint_every=1000))
    train_ldm(config, data / "prep" / "manifest.csv", data / "ae", tmp_path / "run", device="cpu", progress=False)
    rows = _metrics(tmp_path / "run")
    losses = [float(r["train_denoise"]) for r in rows if r.get("train_denoise")]
    assert len(losses) == 40
    # train batches differ in timesteps, so compare averages; the validation loss uses fixed noise and timesteps
    assert np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8]), losses
    val = [float(r["val_denoise"]) for r in rows if r.get("val_denoise")]
    assert len(val) == 8 and val[-1] < val[0], val


def test_generate_is_deterministic_and_marked_synthetic(trained, tmp_path):
    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu")
    report = "PI-RADS 5 lesion in the left peripheral zone, mid gland, 18 mm, markedly restricted diffusion."
    a = pipe(report, seed=3, steps=3)
    b = pipe(report, seed=3, steps=3)
    c = pipe(report, seed=4, steps=3)
    for name in ("AxT2", "HighB", "ADC"):
        assert np.array_equal(a.exam.volumes[name].array, b.exam.volumes[name].array)
        assert not np.array_equal(a.exam.volumes[name].array, c.exam.volumes[name].array)
        vol = a.exam.volumes[name]
        assert vol.shape == (32, 32, 16) and vol.spacing == (4.0, 4.0, 4.0)
        assert vol.metadata[SYNTHETIC_KEY] == "true"
    adc = a.exam.volumes["ADC"].array
    assert adc.min() >= 0.0 and adc.max() <= 3000.0  # 10^-6 mm^2/s, the inverted 0-3000 window
    assert 0.0 <= a.class_probability <= 1.0
    a.exam.check_same_space()
    # the grid is centred at the LPS origin
    centre = a.exam.reference.affine_lps @ np.array([15.5, 15.5, 7.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    # guidance batches the null condition in; spacing sets the written geometry
    guided = pipe(report, seed=3, steps=2, guidance=2.0, spacing=(3.0, 3.0, 3.5))
    assert guided.exam.volumes["AxT2"].spacing == (3.0, 3.0, 3.5)
    # guidance applies only at the noise levels of its interval: one that holds no step is no guidance at all
    plain = pipe(report, seed=3, steps=2)
    outside = pipe(report, seed=3, steps=2, guidance=2.0, guidance_interval=(0.0, 1e-6))
    inside = pipe(report, seed=3, steps=2, guidance=2.0, guidance_interval=(0.0, 1.0))
    # (compared by size, not bytes: CPU kernels may reorder sums between calls, e.g. AVX2's, ~1e-7 relative;
    # the tiny model's guidance effect is ~1e-5 relative)
    def change(out):
        return float(np.abs(out.exam.volumes["HighB"].array - plain.exam.volumes["HighB"].array).max())
    assert change(outside) < 0.1 * change(inside)
    assert inside.settings["guidance_interval"] == [0.0, 1.0]
    with pytest.raises(ConfigError, match=r"0 <= low < high <= 1.*guidance_interval"):
        pipe(report, seed=3, steps=2, guidance=2.0, guidance_interval=(0.6, 0.2))
    assert pipe(None, unconditional=True, seed=0, steps=2).settings["unconditional"] is True


def test_channels_last_unet_gives_the_same_exam(trained):
    # bf16 on a CPU runs the U-Net channels-last-3d (precision.unet_memory_format); the layout must not change the
    # exam beyond float reordering. Checked in fp32, where every CPU is fast.
    assert unet_memory_format("cpu", torch.bfloat16) == torch.channels_last_3d
    assert unet_memory_format("cpu", torch.float32) == torch.contiguous_format
    assert unet_memory_format("cuda", torch.bfloat16) == torch.contiguous_format
    report = "PI-RADS 4 lesion in the right peripheral zone, apex, 12 mm."
    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu", dtype=torch.float32)
    plain = pipe(report, seed=5, steps=3, guidance=2.0)
    assert plain.settings["unet_memory_format"] == "contiguous_format"
    pipe.memory_format = torch.channels_last_3d
    pipe.ldm.to(memory_format=torch.channels_last_3d)
    last = pipe(report, seed=5, steps=3, guidance=2.0)
    assert last.settings["unet_memory_format"] == "channels_last_3d"
    for name in ("AxT2", "HighB", "ADC"):
        a, b = plain.exam.volumes[name].array, last.exam.volumes[name].array
        assert np.abs(a - b).max() <= 1e-4 * max(float(np.abs(a).max()), 1.0), name
    assert abs(plain.class_probability - last.class_probability) < 1e-5


def test_report_edge_cases(trained, caplog):
    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu")
    with pytest.raises(ReportError, match="--unconditional"):
        pipe("", steps=2)
    with pytest.raises(ReportError, match="--unconditional"):
        pipe("   \n", steps=2)
    with pytest.raises(ReportError, match="20000"):
        pipe("x" * 100_000, steps=2)
    out = pipe("Läsion ≥ 1.5 cm, ADC 700 µm²/s, PI-RADS 5 — links périphérique.", seed=0, steps=2)
    assert np.isfinite(out.exam.volumes["ADC"].array).all()
    # a long report is truncated from the start with a warning that never contains the text
    long_report = "Benign prostatic hyperplasia noted. " * 200 + "IMPRESSION: PI-RADS 5."
    with caplog.at_level("WARNING"):
        pipe(long_report, seed=0, steps=2)
    assert "dropped" in caplog.text and "hyperplasia" not in caplog.text
    with pytest.raises(CCELLAError, match="sampler 'rflow'.*supported samplers: ddpm, ddim, dpm-solver\\+\\+"):
        pipe("PI-RADS 2.", sampler="rflow", steps=2)


def test_generate_cli_writes_volumes_preview_and_sidecar(trained, tmp_path, capsys):
    report_file = tmp_path / "report.txt"
    report_file.write_text("PI-RADS 4 lesion, right apex, 9 mm.", encoding="utf-8")
    assert main(["generate", "--model", str(trained), "--report-file", str(report_file), "--steps", "2",
                 "--out", str(tmp_path / "exam"), "--format", "nrrd", "--no-progress"]) == 0
    out = tmp_path / "exam"
    assert sorted(p.name for p in out.iterdir()) == ["adc.nrrd", "axt2.nrrd", "generation.json", "highb.nrrd",
                                                    "preview.png"]
    sidecar = json.loads((out / "generation.json").read_text(encoding="utf-8"))
    assert sidecar["synthetic"] is True and sidecar["report"] == "PI-RADS 4 lesion, right apex, 9 mm."
    assert sidecar["seed"] == 0 and sidecar["steps"] == 2 and sidecar["sampler"] == "dpm-solver++"
    assert len(sidecar["model_hash"]) == 64
    assert read_volume(out / "adc.nrrd").metadata[SYNTHETIC_KEY] == "true"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"PI-RADS 4\n\xff\xfe lesion")
    assert main(["generate", "--model", str(trained), "--report-file", str(bad), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "bad.txt" in err and "UTF-8" in err
    assert main(["generate", "--model", str(trained), "--report", "", "--out", str(tmp_path / "y")]) == 1
    assert "--unconditional" in capsys.readouterr().err


def test_model_directory_errors(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "ldm.safetensors").unlink()
    with pytest.raises(CCELLAError, match="ldm.safetensors.*not found"):
        CCELLAPipeline.from_pretrained(broken, device="cpu")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(trained, mismatched)
    cfg = (mismatched / "config.yaml").read_text(encoding="utf-8")
    (mismatched / "config.yaml").write_text(cfg.replace("num_latents: 8", "num_latents: 16"), encoding="utf-8")
    with pytest.raises(CCELLAError, match="ldm"):
        CCELLAPipeline.from_pretrained(mismatched, device="cpu")
    with pytest.raises(CCELLAError, match="not found"):
        CCELLAPipeline.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_embedded_demo_model_loads_and_generates():
    """The shipped model directory matches the code (config, weights, hash) and generates on its own grid."""
    from CCELLACore.pipelines.generate_cli import DEMO_MODEL_DIR

    pipe = CCELLAPipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu", dtype=torch.float32)
    assert pipe.config.sampling.sampler == "rflow" and pipe.text_encoder.feature_dim == 384
    out = pipe("PI-RADS 4 lesion, right apex, 9 mm.", seed=0, steps=2)
    assert out.exam.volumes["AxT2"].shape == (64, 64, 32) and out.settings["sampler"] == "rflow"
    sizes = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert sizes <= 25_000_000  # the repository's budget for the demo model (25 MB)


def test_embedded_demo_model_smoke_honours_reports():
    """CI's small smoke test of the shipped model's faithfulness (the card's figures come from ``ccella honour``):
    with its own sampling defaults, exams from a PI-RADS 5 and a PI-RADS 1 report both show anatomy (gate 0's check
    against 8 real atlas exams), and the adapter gives the PI-RADS 5 report the higher csPCa probability."""
    from CCELLACore.metrics.honour import HonourSettings, anatomy, grid_reference, model_settings
    from CCELLACore.pipelines.generate_cli import DEMO_MODEL_DIR

    pipe = CCELLAPipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu", dtype=torch.float32)
    settings = model_settings(pipe, HonourSettings(atlas_n=8))
    _, references = grid_reference(pipe.config.preprocess.ldm, settings)
    positive = pipe("Findings: 16 mm lesion in the left peripheral zone at the mid gland, markedly hypointense on ADC "
                    "and bright on high b-value DWI. Impression: PI-RADS 5.", seed=0)
    negative = pipe("Findings: no focal lesion. Mild benign prostatic hyperplasia. Impression: PI-RADS 1.", seed=0)
    for out in (positive, negative):
        assert anatomy(out.exam, references)["anatomy"], anatomy(out.exam, references)["anatomy_r"]
    assert positive.class_probability > 0.5 > negative.class_probability


def test_generated_adc_maps_back_through_the_models_own_window(trained):
    """A model trained on another ADC window (``preprocess.ldm.adc_window``) gives ADC in that window's units."""
    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu")
    images = np.full((3, 4, 4, 2), 0.5, np.float32)
    assert np.allclose(pipe.to_exam(images, (1.0, 1.0, 1.0), {}).volumes["ADC"].array, 1500.0)
    ldm = replace(pipe.config.preprocess.ldm, adc_window=(0.0, 2000.0))
    pipe.config = replace(pipe.config, preprocess=replace(pipe.config.preprocess, ldm=ldm))
    exam = pipe.to_exam(images, (1.0, 1.0, 1.0), {})
    assert np.allclose(exam.volumes["ADC"].array, 1000.0)
    assert np.allclose(exam.volumes["HighB"].array, 0.5 * pipe.metadata["reference_intensities"]["HighB"])
