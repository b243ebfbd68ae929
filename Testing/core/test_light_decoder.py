"""The light decoder (``ccella distill-decoder``), decoder choice at generation and tiled decoding, on tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from CCELLACore.cli import main
from CCELLACore.errors import CCELLAError
from CCELLACore.models.autoencoder import build_autoencoder
from CCELLACore.models.light_decoder import (QUALITY_BAR, DecodeTiling, LightDecoder, LightDecoderConfig,
                                             SequenceCodec, meets_quality_bar)
from CCELLACore.models.serialization import load_model_dir, model_hash
from CCELLACore.pipelines.generation import CCELLAPipeline
from CCELLACore.settings import load_config
from CCELLACore.training.distill_decoder import DistillConfig, decoder_agreement, distill_decoder

REPORT = "MRI prostate. 14 mm lesion in the left peripheral zone, mid gland. PI-RADS 5."


@pytest.fixture(scope="module")
def distilled(trained, data, tmp_path_factory):
    """A copy of the tiny trained model with a light decoder distilled for 40 steps."""
    root = tmp_path_factory.mktemp("distill")
    model = root / "model"
    shutil.copytree(trained, model)
    assert main(["distill-decoder", "--model", str(model), "--manifest", str(data / "prep" / "manifest.csv"),
                 "--work", str(root / "work"), "--steps", "40", "--whole", "--batch-size", "2", "--lr", "3e-3",
                 "--device", "cpu", "--no-progress"]) == 0
    return model


def test_distilled_decoder_is_listed_hashed_and_closer_than_an_untrained_one(distilled, trained):
    meta = json.loads((distilled / "model.json").read_text())
    assert meta["components"]["light_decoder"] == "light_decoder.safetensors"
    assert meta["model_hash"] == model_hash(distilled) != json.loads((trained / "model.json").read_text())["model_hash"]
    record = meta["light_decoder"]
    assert record["config"]["num_channels"] == [4, 4, 4]  # the tiny decoder's [8, 8, 8] / 4 (at least 4)
    assert record["quality_bar"] == QUALITY_BAR
    assert record["meets_quality_bar"] == meets_quality_bar(record["quality"])
    q = record["quality"]
    assert q["held_out_exams"] >= 1 and q["training_exams"] >= 1 and q["volumes"] == 3 * q["held_out_exams"]
    _, _, states = load_model_dir(distilled)  # hash verified
    student = LightDecoder(LightDecoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in record["config"].items()}))
    student.load_state_dict(states["light_decoder"])
    # Distillation must beat the same architecture untrained, on the held-out figure's own yardstick.
    config = load_config("tiny")
    teacher = build_autoencoder(config.autoencoder)
    teacher.load_state_dict(states["autoencoder"])
    full = SequenceCodec(teacher, "cpu", torch.float32)
    torch.manual_seed(0)
    z = full.encode(torch.rand(3, 1, 32, 32, 16))
    trained_q = decoder_agreement(full.decode, SequenceCodec(teacher, "cpu", torch.float32,
                                                             light_decoder=student).decode, z)
    torch.manual_seed(1)
    untrained = SequenceCodec(teacher, "cpu", torch.float32, light_decoder=LightDecoder(student.config))
    assert trained_q["psnr_db"] > decoder_agreement(full.decode, untrained.decode, z)["psnr_db"] + 3.0


def test_generation_selects_the_decoder(distilled, trained):
    light = CCELLAPipeline.from_pretrained(distilled, device="cpu", decoder="light")
    full = CCELLAPipeline.from_pretrained(distilled, device="cpu", decoder="full")
    auto = CCELLAPipeline.from_pretrained(distilled, device="cpu")
    out_light, out_full = light(REPORT, seed=0, steps=2), full(REPORT, seed=0, steps=2)
    assert out_light.settings["decoder"] == "light" and out_full.settings["decoder"] == "full"
    met = json.loads((distilled / "model.json").read_text())["light_decoder"]["meets_quality_bar"]
    assert auto.autoencoder.decoder_name == ("light" if met else "full")
    a, b = out_light.exam.volumes["AxT2"].array, out_full.exam.volumes["AxT2"].array
    assert a.shape == b.shape and not (a == b).all()
    # A model without a light decoder: auto falls back to full, light is a clear error naming the job.
    assert CCELLAPipeline.from_pretrained(trained, device="cpu").autoencoder.decoder_name == "full"
    with pytest.raises(CCELLAError, match="distill-decoder"):
        CCELLAPipeline.from_pretrained(trained, device="cpu", decoder="light")
    with pytest.raises(CCELLAError, match="decoder must be one of"):
        CCELLAPipeline.from_pretrained(trained, device="cpu", decoder="tiny")


def test_generate_cli_decoder_and_tiles(distilled, tmp_path):
    assert main(["generate", "--model", str(distilled), "--report", REPORT, "--steps", "1", "--decoder", "light",
                 "--decode-tile", "4", "4", "4", "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    sidecar = json.loads((tmp_path / "e" / "generation.json").read_text())
    assert sidecar["decoder"] == "light" and sidecar["decode_tile"] == [4, 4, 4]


def test_interrupted_distillation_resumes_exactly(trained, data, tmp_path):
    cfg = DistillConfig(steps=6, batch_size=2, crop=(4, 4, 4), checkpoint_every=3)
    manifest = data / "prep" / "manifest.csv"
    records = []
    for name, stops in (("once", [None]), ("pieces", [3, None])):
        model = tmp_path / name
        shutil.copytree(trained, model)
        for stop in stops:
            record = distill_decoder(model, manifest, tmp_path / f"work-{name}", cfg, device="cpu", stop_after=stop,
                                     progress=False)
            assert (record is None) == (stop is not None)
            assert ("light_decoder" in json.loads((model / "model.json").read_text())) == (stop is None)
        records.append(load_model_dir(model)[2]["light_decoder"])
    assert all(torch.equal(records[0][k], records[1][k]) for k in records[0])


def test_tiled_decoding():
    torch.manual_seed(0)
    ae = build_autoencoder(load_config("tiny").autoencoder)
    z = torch.randn(1, 4, 12, 12, 4)
    whole = SequenceCodec(ae, "cpu", torch.float32).decode(z)

    def tiled(roi, overlap=0.5):
        return SequenceCodec(ae, "cpu", torch.float32, tiling=DecodeTiling(roi, overlap)).decode(z)

    # A tile covering the latent (or more) is exactly the untiled decode.
    assert torch.equal(tiled((12, 12, 4)), whole) and torch.equal(tiled((32, 32, 32)), whole)
    # Smaller tiles blend into the full-size volume; GroupNorm statistics per tile make them approximate, less so
    # with more context per tile.
    small, large = tiled((6, 6, 4)), tiled((8, 8, 4))
    assert small.shape == whole.shape == (1, 1, 48, 48, 16)
    assert 0 < (large - whole).abs().mean() < (small - whole).abs().mean()
    with pytest.raises(CCELLAError, match="overlap"):
        DecodeTiling((8, 8, 8), overlap=1.0)


def test_synthesize_and_honour_decode_with_the_chosen_decoder(distilled, data, tmp_path):
    """`--decoder` reaches bulk synthesis (each exam's sidecar, the summary) and `ccella honour` (generated exams and
    the autoencoder ceiling alike; its figures, card line and journal key name it)."""
    out = tmp_path / "synth"
    assert main(["synthesize", "--manifest", str(data / "prep" / "manifest.csv"), "--model", str(distilled),
                 "--out", str(out), "--splits", "val", "--steps", "1", "--decoder", "light", "--no-progress"]) == 0
    summary = json.loads((out / "synthesize_summary.json").read_text(encoding="utf-8"))
    sidecars = [json.loads(p.read_text(encoding="utf-8")) for p in out.rglob("generation.json")]
    assert summary["decoder"] == "light" and sidecars and all(s["decoder"] == "light" for s in sidecars)

    honour = ["honour", "--model", str(distilled), "--n", "2", "--atlas-n", "2", "--steps", "1", "--device", "cpu",
              "--handwritten-seeds", "0", "--phantom-size", "32", "32", "16", "--phantom-spacing", "4", "4", "4",
              "--no-progress"]
    figures = {}
    for decoder in ("full", "light"):
        assert main([*honour, "--decoder", decoder, "--out", str(tmp_path / decoder)]) == 0
        figures[decoder] = json.loads((tmp_path / decoder / "honour.json").read_text(encoding="utf-8"))
        assert figures[decoder]["settings"]["decoder"] == decoder
        card = (tmp_path / decoder / "honour.md").read_text(encoding="utf-8")
        assert f"| Decoder (generated exams and the autoencoder ceiling) | {decoder} |" in card
        assert f"--decoder {decoder} --precision " in card and " --out OUT" in card
    # the same exams decoded twice: the class head is the same, the images (and so the anatomy r) are not
    full, light = figures["full"]["records"], figures["light"]["records"]
    assert [r["probability"] for r in full] == [r["probability"] for r in light]
    assert [r["anatomy_r"] for r in full] != [r["anatomy_r"] for r in light]
