"""The report's lesion side as a U-Net input (``unet.side_map``): the side labels read from lesion masks agree with
the phantom world's truth (the LPS convention end to end), the map is positive on the reported side, a model grown
from one without it starts as that model, and training with it learns from the side loss."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from CCELLACore.data.phantoms import generate_phantom
from CCELLACore.data.preprocess import preprocess_exam
from CCELLACore.metrics.honour import report_side
from CCELLACore.models.ldm import CCELLALDM, LDMConfig, load_grown_state
from CCELLACore.models.losses import ccella_loss
from CCELLACore.models.unet import SIDES, CCELLAUNet, UNetConfig, side_map
from CCELLACore.settings import load_config
from CCELLACore.training.latents import _lesion_fraction, lesion_sides
from CCELLACore.training.ldm import train_ldm


def _with_side_map(config: LDMConfig) -> LDMConfig:
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, side_map=True))


def test_lesion_sides_read_the_half_that_holds_more_lesion():
    lesion = torch.zeros(4, 1, 16, 16, 8)
    lesion[1, 0, 12, 5, 3] = 1.0          # larger index = patient left
    lesion[2, 0, 2:4, 5, 3] = 1.0         # right
    lesion[3, 0, 7, 5, 3] = 0.2           # a trace below the minimum mass: no lesion
    assert lesion_sides(lesion).tolist() == [0, 1, 2, 0]
    lesion[1, 0, 1, 5, 3] = 0.6           # a smaller right lesion beside the left one: left still wins
    assert lesion_sides(lesion)[1] == 1
    assert SIDES == ("none", "left", "right")


def test_side_labels_of_preprocessed_phantoms_match_the_truth_side():
    """Phantoms rendered, preprocessed onto the gland-centred grid, lesion fraction at 4x compression: the side
    label equals the truth side of every single-lesion case whose lesion survives the grid."""
    config = load_config("demo").preprocess.ldm
    config = dataclasses.replace(config, grid=dataclasses.replace(config.grid, size=(32, 32, 16),
                                                                  spacing=(2.0, 2.0, 3.0)))
    checked = {"left": 0, "right": 0}
    for index in range(40):
        phantom = generate_phantom(index, 1, (64, 64, 32), (1.5, 1.5, 2.0), seed=0)
        if len(phantom.truth.lesions) != 1:
            continue
        exam, _ = preprocess_exam(phantom.exam, config)
        side = int(lesion_sides(_lesion_fraction(exam, (8, 8, 4))[None])[0])
        if side == 0:
            continue
        truth = report_side(phantom.truth)
        assert SIDES[side] == truth, (index, SIDES[side], truth)
        checked[truth] += 1
        if min(checked.values()) >= 2:
            break
    assert min(checked.values()) >= 2, checked


def test_side_map_is_positive_on_the_reported_side_and_zero_without_a_lesion():
    x = torch.zeros(3, 12, 16, 8, 4)
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    m = side_map(probs, x)
    assert m.shape == (3, 1, 16, 8, 4)
    assert (m[0, 0, 8:] > 0).all() and (m[0, 0, :8] < 0).all()     # left: positive at larger (left) indices
    assert torch.equal(m[1], -m[0])
    assert not m[2].any()
    assert torch.equal(m[0, 0, :, 0, 0], torch.linspace(-1, 1, 16))


def test_side_map_unet_checks_its_input_and_a_grown_model_starts_as_the_old_one():
    net = CCELLAUNet(dataclasses.replace(UNetConfig.tiny(), side_map=True))
    assert net.conv_in.conv.weight.shape[1] == 13
    x, t = torch.zeros(1, 12, 16, 16, 8), torch.tensor([5])
    with pytest.raises(ValueError, match=r"side_probs must be \(1, 3\)"):
        net(x, t, torch.zeros(1, 8, 32), torch.tensor([[0.5, 0.5]]), torch.ones(1, 3))

    torch.manual_seed(0)
    small = CCELLALDM(LDMConfig.tiny()).eval()
    grown = CCELLALDM(_with_side_map(LDMConfig.tiny())).eval()
    names = load_grown_state(grown, small.state_dict(), "small.safetensors")
    assert names[0] == "unet.conv_in.conv.weight" and all(n.startswith("side_head.") for n in names[1:])
    assert not grown.unet.conv_in.conv.weight[:, 12:].any()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 16, 16, 8, generator=g)
    features, mask = torch.randn(2, 7, 24, generator=g), torch.ones(2, 7, dtype=torch.bool)
    args = (x, torch.tensor([10, 700]), torch.ones(2, 3), features, mask)
    with torch.no_grad():
        a, b = small(*args), grown(*args)
    assert torch.allclose(a.prediction, b.prediction, atol=1e-6)
    assert a.side_logits is None and b.side_logits.shape == (2, 3)


def test_side_loss_counts_only_masked_exams_and_is_added_with_its_weight():
    pred, target = torch.zeros(2, 4, 2, 2, 2), torch.ones(2, 4, 2, 2, 2)
    logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])
    side_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    common = dict(side_logits=side_logits, side_labels=torch.tensor([0, 1]), side_loss_weight=0.5)
    only_first = ccella_loss(pred, target, logits, labels, torch.ones(2, dtype=torch.bool),
                             side_mask=torch.tensor([True, False]), **common)
    both = ccella_loss(pred, target, logits, labels, torch.ones(2, dtype=torch.bool),
                       side_mask=torch.tensor([True, True]), **common)
    first = float(torch.nn.functional.cross_entropy(side_logits[:1], torch.tensor([0])))
    assert only_first["side"].item() == pytest.approx(first)
    assert both["side"].item() == pytest.approx((first + np.log(3)) / 2)
    assert (only_first["total"] - only_first["denoise"] - 0.1e-1 * only_first["cls"]).item() == pytest.approx(
        0.5 * first, rel=1e-5)


def test_train_ldm_with_a_side_map_logs_the_side_loss_and_records_the_option(data, trained, tmp_path):
    config = load_config("tiny", ["ldm.unet.side_map=true", "loss.side_loss_weight=0.5"])
    model_dir = train_ldm(config, data / "prep" / "manifest.csv", trained, tmp_path / "run", device="cpu",
                          max_steps=2, progress=False, init=trained)
    assert load_config(model_dir / "config.yaml").ldm.unet.side_map is True
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train_side" in header
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["extra"]["initialised_from"] == json.loads((trained / "model.json").read_text())["model_hash"]


@torch.no_grad()
def test_the_reports_side_reaches_the_unet_through_the_side_head(trained):
    """Cut anywhere between the report's side word and the U-Net's side channel, and this fails: a live side-map
    LDM (zero-initialised weights redrawn, as in test_conditioning.py) on the tiny model's MiniLM features."""
    from CCELLACore.pipelines.generation import CCELLAPipeline

    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    ldm = CCELLALDM(_with_side_map(pipe.config.ldm)).eval()
    for p in ldm.parameters():
        if not p.any():
            p.copy_(0.1 * torch.randn(p.shape))
    left = "Findings: 15 mm lesion in the left peripheral zone, mid gland. Impression: PI-RADS 5, left PZ."
    encodings = [pipe.text_encoder.encode([r], names=["r"]) for r in (left, left.replace("left", "right"))]
    x = torch.randn(pipe.latent_shape(), generator=torch.Generator().manual_seed(0))
    t, spacing = torch.tensor([500]), torch.tensor([pipe.metadata["spacing"]], dtype=torch.float32)
    outs = [ldm(x, t, spacing, e.features, e.mask) for e in encodings]
    assert not torch.allclose(outs[0].side_logits, outs[1].side_logits)      # report -> adapter -> side head
    context, logits = ldm.adapter(encodings[0].features, encodings[0].mask, t)
    probs = torch.softmax(logits, -1)
    side = torch.softmax(ldm.side_head(context), -1)
    base = ldm.unet(x, t, context, probs, spacing, side)
    assert torch.allclose(base, outs[0].prediction, atol=1e-6)               # the LDM is exactly head -> U-Net
    mirrored = ldm.unet(x, t, context, probs, spacing, side[:, [0, 2, 1]])
    scale = base.abs().mean()
    assert (mirrored - base).abs().mean() > 1e-4 * scale, "the U-Net ignores its side channel"


@pytest.fixture(scope="module")
def side_model(data, trained, tmp_path_factory):
    """The tiny model grown by a side map and trained 2 steps at a high learning rate (so the map matters)."""
    config = load_config("tiny", ["ldm.unet.side_map=true", "loss.side_loss_weight=0.5", "train_ldm.lr=0.05"])
    return train_ldm(config, data / "prep" / "manifest.csv", trained, tmp_path_factory.mktemp("side") / "run",
                     device="cpu", max_steps=2, progress=False, init=trained)


def test_side_contrast_guidance_changes_only_guided_steps(side_model):
    """``sampling.side_contrast``: the null half of guidance gets the report's mirrored side. Without guidance the
    exam is unchanged; with it, it changes; the sidecar settings say which was used."""
    from CCELLACore.pipelines.generation import CCELLAPipeline

    pipe = CCELLAPipeline.from_pretrained(side_model, device="cpu", dtype=torch.float32)
    report = "Findings: 15 mm lesion in the left peripheral zone, mid gland. Impression: PI-RADS 5."
    plain = {g: pipe(report, seed=1, steps=2, guidance=g) for g in (1.0, 2.0)}
    pipe.config = dataclasses.replace(pipe.config, sampling=dataclasses.replace(pipe.config.sampling,
                                                                                side_contrast=True))
    contrast = {g: pipe(report, seed=1, steps=2, guidance=g) for g in (1.0, 2.0)}
    highb = {k: {g: o.exam.volumes["HighB"].array for g, o in v.items()} for k, v in
             (("plain", plain), ("contrast", contrast))}
    # compared by size, not bytes: CPU kernels may reorder sums between calls (AVX2), ~1e-7 relative
    unguided = float(np.abs(highb["plain"][1.0] - highb["contrast"][1.0]).max())
    guided = float(np.abs(highb["plain"][2.0] - highb["contrast"][2.0]).max())
    assert unguided < 0.1 * guided, (unguided, guided)
    assert contrast[2.0].settings["side_contrast"] is True and plain[2.0].settings["side_contrast"] is False
    assert pipe(None, unconditional=True, seed=1, steps=2, guidance=2.0).settings["side_contrast"] is False


def test_side_scale_multiplies_the_map_and_leaves_unsided_generation_alone(side_model):
    """``sampling.side_scale``: the U-Net's map is k times the side head's reading; 1 gives the trained model's exam,
    another scale changes it, the unconditional exam ignores it, and a bad scale names its key."""
    from CCELLACore.errors import ConfigError
    from CCELLACore.pipelines.generation import CCELLAPipeline

    probs, x = torch.tensor([[0.2, 0.7, 0.1]]), torch.zeros(1, 4, 8, 2, 2)
    scaled = probs * torch.tensor([1.0, 3.0, 3.0])
    assert torch.allclose(side_map(scaled, x), 3 * side_map(probs, x))

    pipe = CCELLAPipeline.from_pretrained(side_model, device="cpu", dtype=torch.float32)
    report = "Findings: 15 mm lesion in the left peripheral zone, mid gland. Impression: PI-RADS 5."
    runs = {k: pipe(report, seed=1, steps=2, side_scale=k) for k in (None, 1.0, 4.0)}
    highb = {k: o.exam.volumes["HighB"].array for k, o in runs.items()}
    # compared by size, not bytes (CPU kernels may reorder sums between calls)
    same = float(np.abs(highb[None] - highb[1.0]).max())
    moved = float(np.abs(highb[4.0] - highb[1.0]).max())
    assert same < 0.1 * moved, (same, moved)
    assert runs[4.0].settings["side_scale"] == 4.0 and runs[None].settings["side_scale"] == 1.0
    # with guidance and without side contrast: the report's half is scaled, the null half keeps its own reading
    guided = {k: pipe(report, seed=1, steps=2, guidance=2.0, side_scale=k).exam.volumes["HighB"].array
              for k in (1.0, 4.0)}
    assert float(np.abs(guided[4.0] - guided[1.0]).max()) > 10 * same
    assert pipe(None, unconditional=True, seed=1, steps=2, side_scale=4.0).settings["side_scale"] == 1.0
    with pytest.raises(ConfigError, match="side_scale"):
        pipe(report, seed=1, steps=2, side_scale=-1.0)
    with pytest.raises(ConfigError, match="side_scale"):
        load_config("tiny", ["sampling.side_scale=11"])
