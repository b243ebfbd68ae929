"""Tests of the generative core: CCELLA adapter, U-Net, CCELLALDM, joint loss and condition dropout."""

from __future__ import annotations

import pytest
import torch
from monai.losses import FocalLoss
from torch import nn

from CCELLACore.config import from_dict
from CCELLACore.errors import ConfigError
from CCELLACore.models.adapter import AdaLayerNorm, AdapterConfig, CCELLAAdapter, sinusoidal_timestep_embedding
from CCELLACore.models.ldm import CCELLALDM, LDMConfig, condition_dropout
from CCELLACore.models.losses import PAPER_CLASS_LOSS_WEIGHT, LossConfig, ccella_loss, class_focal_loss
from CCELLACore.models.unet import CCELLAUNet, UNetConfig, map_reference_unet_keys

LATENT = (12, 16, 16, 8)
# Reference parameter counts (MONAI 1.4.0, measured; reference section 3).
REF_UNET = 206_903_564
REF_ADAPTER = 370_535_436
REF_CLASS_ADAPTORS = 301_994_508
REF_CLASSIFIER = 26
# MONAI 1.4 created the self-attention out_proj (C*C + C) even with include_fc=False and never used it; MONAI 1.6 does
# not create it: 5 transformers at 256 channels + 6 at 512 (down 2+2, mid 1, up 3+3).
UNUSED_OUT_PROJ = 5 * (256 * 256 + 256) + 6 * (512 * 512 + 512)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomise_zero_init(module: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised weights (output convs, AdaLN projections) random values, as after training, so that
    every input can influence the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def tiny_adapter() -> CCELLAAdapter:
    torch.manual_seed(0)
    return CCELLAAdapter(AdapterConfig.tiny()).eval()


@pytest.fixture(scope="module")
def trained_like_ldm() -> CCELLALDM:
    torch.manual_seed(0)
    model = CCELLALDM(LDMConfig.tiny())
    randomise_zero_init(model)
    return model.eval()


def text_batch(batch: int = 2, length: int = 6, valid: tuple[int, ...] = (4, 2), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, AdapterConfig.tiny().input_dim, generator=gen)
    mask = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]
    return features, mask


# ----------------------------------------------------------------------------------------------------- adapter
def test_sinusoidal_embedding_is_cos_then_sin():
    emb = sinusoidal_timestep_embedding(torch.tensor([0, 7]), 16)
    assert emb.shape == (2, 16)
    assert torch.equal(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(8) / 8)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_adapter_shapes(tiny_adapter):
    features, mask = text_batch()
    context, logits = tiny_adapter(features, mask, torch.tensor([3, 900]))
    assert context.shape == (2, 8, 32) and logits.shape == (2, 2)
    assert torch.isfinite(context).all() and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="input_dim"):
        tiny_adapter(torch.randn(2, 6, 7), mask, torch.tensor([3, 900]))
    with pytest.raises(ValueError, match="text_mask"):
        tiny_adapter(features, mask.float(), torch.tensor([3, 900]))


def test_adapter_ignores_padding(tiny_adapter):
    features, mask = text_batch()
    t = torch.tensor([3, 900])
    context, logits = tiny_adapter(features, mask, t)
    garbage = torch.where(mask[..., None], features, 1e3 * torch.randn_like(features))
    context2, logits2 = tiny_adapter(garbage, mask, t)
    torch.testing.assert_close(context2, context, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-6)
    # more padding tokens at the end: same result
    longer = torch.cat([features, torch.randn(2, 5, features.shape[2])], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(tiny_adapter(longer, longer_mask, t)[0], context, rtol=0, atol=1e-5)
    # a real token does matter (so the checks above can fail)
    changed = features.clone()
    changed[0, 0] += 1.0
    assert (tiny_adapter(changed, mask, t)[0][0] - context[0]).abs().max() > 1e-3


def test_adapter_empty_text_is_finite(tiny_adapter):
    features, _ = text_batch()
    empty = torch.zeros(2, 6, dtype=torch.bool)
    context, logits = tiny_adapter(features, empty, torch.tensor([0, 999]))
    assert torch.isfinite(context).all() and torch.isfinite(logits).all()
    # zero tokens at all (L = 0) gives the same as all-padding
    context0, logits0 = tiny_adapter(features[:, :0], empty[:, :0], torch.tensor([0, 999]))
    torch.testing.assert_close(context0, context, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits0, logits, rtol=0, atol=1e-6)


def test_adaln_zero_init_ignores_time_until_trained():
    torch.manual_seed(0)
    norm = AdaLayerNorm(32, 16)
    x, t1, t2 = torch.randn(2, 5, 32), torch.randn(2, 16), torch.randn(2, 16)
    plain = nn.functional.layer_norm(x, (32,), eps=1e-6)
    torch.testing.assert_close(norm(x, t1), plain)
    torch.testing.assert_close(norm(x, t2), plain)
    with torch.no_grad():
        norm.linear.weight.normal_(0, 0.1)
    assert (norm(x, t1) - norm(x, t2)).abs().max() > 1e-3


def test_adapter_time_enters_through_latents_at_init(tiny_adapter):
    # AdaLN is time-blind at init, but the latents get + Linear(SiLU(t_emb)) (not zero-initialised, as in ELLA)
    features, mask = text_batch()
    c1, _ = tiny_adapter(features, mask, torch.tensor([1, 1]))
    c2, _ = tiny_adapter(features, mask, torch.tensor([900, 900]))
    assert (c1 - c2).abs().max() > 1e-3
    assert all(torch.count_nonzero(b.ln_1.linear.weight) == 0 for b in tiny_adapter.blocks)


# -------------------------------------------------------------------------------------------------------- U-Net
def test_unet_shapes_and_conditioning(trained_like_ldm):
    unet = trained_like_ldm.unet
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, *LATENT, generator=gen)
    context = torch.randn(1, 8, 32, generator=gen)
    t, spacing = torch.tensor([10]), torch.tensor([[2.0, 2.0, 2.0]])
    neg, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    with torch.no_grad():
        out = unet(x, t, context, neg, spacing)
        assert out.shape == (1, *LATENT)
        assert (unet(x, t, context, pos, spacing) - out).abs().max() > 1e-4
        assert (unet(x, t, context, neg, spacing * 1.5) - out).abs().max() > 1e-4
        assert (unet(x, t, 2 * context, neg, spacing) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="multiples of 8"):
        unet(torch.randn(1, 12, 12, 16, 8), t, context, neg, spacing)
    with pytest.raises(ValueError, match="class_probs"):
        unet(x, t, context, torch.ones(1, 3), spacing)


def test_unet_stock_embedding_layout():
    unet = CCELLAUNet(UNetConfig.tiny())
    # time 4*C0 + class 4*C0 + spacing 4*C0 reaches every ResBlock
    assert unet.class_layer[0].in_features == 2 and unet.class_layer[2].out_features == 32
    assert unet.down_blocks[0].resnets[0].time_emb_proj.in_features == 3 * 32
    assert not hasattr(unet, "top_region_index_layer")


def test_unet_sdpa_matches_explicit_attention(trained_like_ldm):
    unet = trained_like_ldm.unet
    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(2, *LATENT, generator=gen), torch.tensor([5, 600]), torch.randn(2, 8, 32, generator=gen),
            torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([[2.0, 2.0, 2.0], [0.5, 0.5, 3.0]]))
    with torch.no_grad():
        unet.set_flash_attention(True)
        fused = unet(*args)
        unet.set_flash_attention(False)
        explicit = unet(*args)
        unet.set_flash_attention(True)
    assert fused.abs().max() > 1e-3
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_paper_parameter_counts_on_meta_device():
    with torch.device("meta"):
        unet = CCELLAUNet(UNetConfig())
        adapter = CCELLAAdapter(AdapterConfig())
    assert n_params(unet) == REF_UNET - UNUSED_OUT_PROJ == 204_998_668
    assert abs(n_params(unet) - REF_UNET) / REF_UNET < 0.01
    pooled_heads = 6 * ((768 * 32 + 32) + (32 * 2 + 2))
    assert n_params(adapter) == REF_ADAPTER - REF_CLASS_ADAPTORS + pooled_heads + REF_CLASSIFIER == 68_688_998
    assert n_params(adapter) < REF_ADAPTER / 5


def test_map_reference_unet_keys():
    sd = {"pirads_layer.0.weight": torch.zeros(1), "a.transformer_blocks.0.attn1.out_proj.weight": torch.zeros(1),
          "a.transformer_blocks.0.attn2.out_proj.weight": torch.zeros(1)}
    assert sorted(map_reference_unet_keys(sd)) == ["a.transformer_blocks.0.attn2.out_proj.weight",
                                                   "class_layer.0.weight"]


# ---------------------------------------------------------------------------------------------------------- LDM
def test_ldm_config_checks_and_yaml():
    cfg = from_dict(LDMConfig, {"adapter": {"input_dim": 384, "width": 32, "heads": 4, "layers": 2,
                                            "num_latents": 8, "time_channel": 16, "time_embed_dim": 32},
                                "unet": {"num_channels": [8, 8, 16, 16], "num_head_channels": [0, 0, 8, 8],
                                         "num_res_blocks": 1, "cross_attention_dim": 32, "norm_num_groups": 4}},
                    file="tiny.yaml")
    assert cfg.adapter.input_dim == 384 and cfg.unet.num_channels == (8, 8, 16, 16)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        from_dict(LDMConfig, {"adapter": {"width": 64}}, file="bad.yaml")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        from_dict(LDMConfig, {"unet": {"num_channels": [60, 128, 256, 512]}}, file="bad.yaml")
    paper = LDMConfig()
    assert (paper.adapter.input_dim, paper.adapter.num_latents, paper.unet.in_channels) == (4096, 256, 12)
    assert paper.unet.class_input_scale == 100.0 and paper.unet.spacing_input_scale == 100.0


def test_ldm_forward_shapes(trained_like_ldm):
    features, mask = text_batch()
    with torch.no_grad():
        out = trained_like_ldm(torch.randn(2, *LATENT), torch.tensor(50), torch.full((2, 3), 2.0), features, mask)
    assert out.prediction.shape == (2, *LATENT)
    assert out.class_logits.shape == (2, 2)
    torch.testing.assert_close(out.class_probs.sum(dim=1), torch.ones(2))


def test_denoising_loss_alone_trains_the_class_head(trained_like_ldm):
    model = trained_like_ldm
    model.zero_grad()
    features, mask = text_batch()
    x, noise = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    out = model(x, torch.tensor([10, 700]), torch.full((2, 3), 2.0), features, mask)
    losses = ccella_loss(out.prediction, noise, out.class_logits, torch.tensor([0, 1]), torch.tensor([True, True]),
                         class_loss_weight=0.0)
    losses["total"].backward()
    for head in model.adapter.class_heads:
        assert head.net[0].weight.grad.abs().sum() > 0
    assert model.adapter.classifier.weight.grad.abs().sum() > 0
    assert model.adapter.proj_in.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_zero_init_output_blocks_gradient_at_init():
    # Fact worth knowing: MONAI zero-initialises the U-Net's output conv, so at step 0 only it receives a gradient.
    torch.manual_seed(0)
    model = CCELLALDM(LDMConfig.tiny())
    features, mask = text_batch()
    out = model(torch.randn(1, *LATENT), torch.tensor([10]), torch.full((1, 3), 2.0), features[:1], mask[:1])
    nn.functional.l1_loss(out.prediction, torch.randn(1, *LATENT)).backward()
    assert model.adapter.classifier.weight.grad.abs().sum() == 0
    assert model.unet.out[2].conv.weight.grad.abs().sum() > 0


def test_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = CCELLALDM(LDMConfig.tiny())
    features, mask = text_batch()
    x, noise = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    t, spacing, labels = torch.tensor([10, 700]), torch.full((2, 3), 2.0), torch.tensor([0, 1])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(8):
        out = model(x, t, spacing, features, mask)
        loss = ccella_loss(out.prediction, noise, out.class_logits, labels, torch.tensor([True, True]), 1.0)
        optimiser.zero_grad()
        loss["total"].backward()
        optimiser.step()
        totals.append(loss["total"].item())
    assert totals[-1] < 0.9 * totals[0]


# --------------------------------------------------------------------------------------------------------- loss
def test_class_loss_value_and_masking():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-3.0, 4.0]])
    labels = torch.tensor([1, 0, 1])
    p = torch.softmax(logits, dim=1)
    p_true = p[torch.arange(3), labels]
    alpha = torch.tensor([0.25, 0.75])[labels]
    per_exam = -alpha * (1 - p_true) ** 2 * torch.log(p_true)
    has_report = torch.tensor([True, False, True])
    cls = class_focal_loss(logits, labels, has_report)
    torch.testing.assert_close(cls, per_exam[has_report].mean())
    # the exam without a report does not count
    other = logits.clone()
    other[1] = torch.tensor([-9.0, 9.0])
    torch.testing.assert_close(class_focal_loss(other, labels, has_report), cls)


def test_all_null_batch_has_zero_class_loss():
    logits = torch.randn(3, 2, requires_grad=True)
    pred, target = torch.randn(3, 4, 8, 8, 8), torch.randn(3, 4, 8, 8, 8)
    losses = ccella_loss(pred, target, logits, torch.tensor([0, 1, 1]), torch.zeros(3, dtype=torch.bool))
    assert losses["cls"].item() == 0.0
    torch.testing.assert_close(losses["total"], losses["denoise"])
    torch.testing.assert_close(losses["denoise"], (pred - target).abs().mean())
    losses["total"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_paper_weight_equals_reference_formulation():
    """Reference: FocalLoss(alpha 0.75, softmax, reduction none) on one-hot x100, masked sum / #non-null, x 1e-4.
    MONAI's softmax focal loss is -alpha_c (1 - p_c)^gamma log p_c * target_c: linear in the target, so this is
    exactly 1e-2 x the one-hot loss. (MONAI's sigmoid variant is not linear in the target; see the last check.)"""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 2, generator=gen) * 3
    labels = torch.randint(0, 2, (8,), generator=gen)
    is_null = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    target100 = nn.functional.one_hot(labels, 2).float() * 100
    ref = FocalLoss(alpha=0.75, use_softmax=True, reduction="none")(logits, target100)
    ref_weighted = 1e-4 * (ref * (~is_null)[:, None]).sum() / (~is_null).sum()
    ours = PAPER_CLASS_LOSS_WEIGHT * class_focal_loss(logits, labels, ~is_null)
    torch.testing.assert_close(ours, ref_weighted, rtol=1e-6, atol=0)
    assert LossConfig().class_loss_weight == 1e-2
    onehot = target100 / 100
    sig1 = FocalLoss(alpha=0.75, reduction="sum")(logits, onehot)
    sig100 = FocalLoss(alpha=0.75, reduction="sum")(logits, target100)
    assert not torch.allclose(sig100, 100 * sig1, rtol=1e-2)


# ----------------------------------------------------------------------------------------------- CFG dropout
def test_condition_dropout_replaces_with_null():
    features, mask = text_batch(batch=4, length=6, valid=(6, 3, 1, 0))
    null_f, null_m = torch.randn(2, features.shape[2]), torch.tensor([True, False])
    res = condition_dropout(features, mask, null_f, null_m, p=0.5, generator=torch.Generator().manual_seed(5))
    assert res.features.shape == features.shape and res.mask.shape == mask.shape
    for i in range(4):
        if res.dropped[i]:
            assert torch.equal(res.features[i, :2], null_f) and torch.equal(res.features[i, 2:], torch.zeros(4, 24))
            assert res.mask[i].tolist() == [True] + [False] * 5
        else:
            assert torch.equal(res.features[i], features[i]) and torch.equal(res.mask[i], mask[i])
    assert 0 < int(res.dropped.sum()) < 4  # seed 5 drops some but not all of 4
    # a null encoding longer than the batch's text pads the batch
    long_null = condition_dropout(features, mask, torch.randn(1, 9, 24), torch.ones(1, 9, dtype=torch.bool), p=1.0)
    assert long_null.features.shape == (4, 9, 24) and long_null.dropped.all() and long_null.mask.all()
    assert not condition_dropout(features, mask, null_f, null_m, p=0.0).dropped.any()
    with pytest.raises(ValueError, match="probability"):
        condition_dropout(features, mask, null_f, null_m, p=1.5)


def test_condition_dropout_rate_and_determinism():
    features = torch.zeros(20_000, 1, 3)
    mask = torch.ones(20_000, 1, dtype=torch.bool)
    null_f, null_m = torch.ones(1, 3), torch.zeros(1, dtype=torch.bool)
    a = condition_dropout(features, mask, null_f, null_m, p=0.1, generator=torch.Generator().manual_seed(7))
    b = condition_dropout(features, mask, null_f, null_m, p=0.1, generator=torch.Generator().manual_seed(7))
    c = condition_dropout(features, mask, null_f, null_m, p=0.1, generator=torch.Generator().manual_seed(8))
    assert abs(a.dropped.float().mean().item() - 0.1) < 0.01  # 0.01 ~ 4.7 standard deviations
    assert torch.equal(a.dropped, b.dropped) and not torch.equal(a.dropped, c.dropped)
    assert torch.equal(a.features[:, 0, 0] == 1, a.dropped)
