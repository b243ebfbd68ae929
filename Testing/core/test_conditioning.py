"""The report reaches the U-Net (the test fails when the path is cut anywhere between report and U-Net), and the
demo's training levers: lesion-weighted denoising loss, lesion fractions in the latent cache, LR warm-up."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from CCELLACore.models.losses import LossConfig, ccella_loss
from CCELLACore.pipelines.generation import CCELLAPipeline
from CCELLACore.training.schedule import polynomial_lr

POSITIVE = ("MRI prostate. Findings: 15 mm lesion in the left peripheral zone at the mid gland, markedly hypointense "
            "on ADC and bright on high b-value DWI. Impression: PI-RADS 5.")
NEGATIVE = "MRI prostate. No focal lesion. Benign prostatic hyperplasia. Impression: PI-RADS 1."


@pytest.fixture(scope="module")
def pipe(trained):
    """The session's tiny model with a freshly initialised LDM whose zero-initialised weights (MONAI's output and
    attention projections, the adapter's AdaLN) are redrawn: 6 training steps leave the report's effect near 1e-4 of
    the output; with live weights every link between report and U-Net carries it at order 1, so a cut link shows."""
    from CCELLACore.models.ldm import CCELLALDM

    pipe = CCELLAPipeline.from_pretrained(trained, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    live = CCELLALDM(pipe.config.ldm).eval()
    with torch.no_grad():
        for p in live.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape))
    pipe.ldm = live
    return pipe


def _inputs(pipe, report, seed=0):
    enc = pipe.text_encoder.encode([report], names=["r"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pipe.latent_shape(), generator=g)
    spacing = torch.tensor([pipe.metadata["spacing"]], dtype=torch.float32)
    return x, torch.tensor([500]), spacing, enc.features, enc.mask


@torch.no_grad()
def test_report_reaches_the_unet_through_context_and_class(pipe):
    ldm = pipe.ldm
    x, t, spacing, f_pos, m_pos = _inputs(pipe, POSITIVE)
    _, _, _, f_neg, m_neg = _inputs(pipe, NEGATIVE)
    out_pos = ldm(x, t, spacing, f_pos, m_pos)
    out_neg = ldm(x, t, spacing, f_neg, m_neg)
    # 1. end to end: another report, another prediction and another class probability
    scale = out_pos.prediction.abs().mean()
    assert (out_pos.prediction - out_neg.prediction).abs().mean() > 1e-3 * scale
    assert not torch.equal(out_pos.class_probs, out_neg.class_probs)
    # 2. each route on its own: the adapter's context (cross-attention) and its class probabilities (embedding)
    context_pos, logits_pos = ldm.adapter(f_pos, m_pos, t)
    context_neg, logits_neg = ldm.adapter(f_neg, m_neg, t)
    probs_pos = torch.softmax(logits_pos.float(), -1)
    probs_neg = torch.softmax(logits_neg.float(), -1)
    base = ldm.unet(x, t, context_pos, probs_pos, spacing)
    assert torch.allclose(base, out_pos.prediction, atol=1e-6)  # the LDM is exactly adapter -> U-Net
    only_context = ldm.unet(x, t, context_neg, probs_pos, spacing)
    only_class = ldm.unet(x, t, context_pos, probs_neg, spacing)
    assert (only_context - base).abs().mean() > 1e-3 * scale, "cross-attention ignores the report"
    assert (only_class - base).abs().mean() > 1e-5 * scale, "the class embedding ignores the report"


def test_generated_exam_depends_on_the_report(pipe):
    a = pipe(POSITIVE, seed=0, steps=2)
    b = pipe(NEGATIVE, seed=0, steps=2)
    assert not (a.exam.volumes["HighB"].array == b.exam.volumes["HighB"].array).all()
    assert a.class_probability != b.class_probability


def test_lesion_weight_scales_the_loss_inside_lesions_only():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 12, 4, 4, 2), torch.randn(2, 12, 4, 4, 2)
    logits, labels, has = torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([True, True])
    plain = ccella_loss(pred, target, logits, labels, has)
    ones = ccella_loss(pred, target, logits, labels, has, voxel_weight=torch.ones(2, 1, 4, 4, 2))
    assert torch.allclose(plain["denoise"], ones["denoise"]) and torch.allclose(plain["total"], ones["total"])
    fraction = torch.zeros(2, 1, 4, 4, 2)
    fraction[0, 0, 1, 1, 0] = 0.5
    weighted = ccella_loss(pred, target, logits, labels, has, voxel_weight=1.0 + 10.0 * fraction)
    l1 = (pred - target).abs()
    expected = plain["denoise"] + 10.0 * 0.5 * l1[0, :, 1, 1, 0].sum() / l1.numel()
    assert torch.allclose(weighted["denoise"], expected)
    with pytest.raises(ValueError, match="lesion_weight"):
        LossConfig(lesion_weight=-1.0)


def test_latent_cache_holds_lesion_fractions(trained, data):
    """train-ldm caches, per exam, the fraction of each latent voxel inside the lesion mask (4x4x4 image voxels)."""
    from CCELLACore.data.manifest import read_manifest
    from CCELLACore.data.volume import read_volume

    cache = trained.parent / "cache" / "latents"
    studies = [s for s in read_manifest(data / "prep" / "manifest.csv").studies if s.split == "train"]
    checked = 0
    for study in studies:
        saved = load_file(str(cache / f"{study.case_id}.safetensors"))
        lesion = read_volume(study.masks["lesion"]).array > 0
        fraction = saved["lesion"].float()  # stored as float16; k/64 fractions are exact in it, their sum is not
        assert fraction.shape == (1, *saved["latent"].shape[1:])
        assert torch.allclose(fraction.sum() * 64, torch.tensor(float(lesion.sum())), atol=1e-3)
        checked += bool(lesion.any())
    assert checked >= 1  # at least one exam with a lesion was compared


def test_warmup_ramps_then_follows_the_polynomial():
    assert polynomial_lr(1.0, 0, 100, 2.0, warmup_steps=10) == pytest.approx(0.1)
    assert polynomial_lr(1.0, 4, 100, 2.0, warmup_steps=10) == pytest.approx(0.5 * 0.96 ** 2)
    assert polynomial_lr(1.0, 50, 100, 2.0, warmup_steps=10) == polynomial_lr(1.0, 50, 100, 2.0) == 0.25
    assert polynomial_lr(1.0, 0, 100, 2.0) == 1.0
