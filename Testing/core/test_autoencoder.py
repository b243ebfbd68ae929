"""Tests of the MAISI autoencoder wrapper, weight loading, latent statistics and precision choice."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from CCELLACore.config import from_dict
from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.models.autoencoder import (
    AutoencoderConfig,
    LatentStats,
    SequenceAutoencoder,
    build_autoencoder,
    load_autoencoder_weights,
)
from CCELLACore.precision import autocast_context, choose_dtype, cpu_has_native_bf16, describe_device

TINY = AutoencoderConfig(num_channels=(8, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=4, num_splits=1)


def tiny_ae(seed: int = 0, cfg: AutoencoderConfig = TINY) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_autoencoder(cfg, "cpu")


class _Evil:
    """Unpickling this creates a marker file: proof that code in a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------- config
def test_paper_defaults_match_maisi():
    cfg = AutoencoderConfig()
    assert (cfg.num_channels, cfg.num_res_blocks, cfg.latent_channels) == ((64, 128, 256), (2, 2, 2), 4)
    assert cfg.attention_levels == (False, False, False) and cfg.norm_num_groups == 32 and cfg.norm_eps == 1e-6
    assert cfg.downsample_factor == 4 and not cfg.use_convtranspose and cfg.weights_path is None


def test_config_from_yaml_mapping_and_validation(tmp_path):
    cfg = from_dict(AutoencoderConfig, {"num_channels": [8, 8, 8], "num_res_blocks": [1, 1, 1],
                                        "norm_num_groups": 4, "num_splits": 1, "weights_path": "ae.pt"})
    assert cfg.num_channels == (8, 8, 8) and cfg.weights_path == Path("ae.pt")
    with pytest.raises(ConfigError, match="divisible by norm_num_groups"):
        from_dict(AutoencoderConfig, {"num_channels": [8, 12, 8], "norm_num_groups": 8}, file="ae.yaml")
    with pytest.raises(ConfigError, match="same non-zero length"):
        from_dict(AutoencoderConfig, {"num_res_blocks": [2, 2]}, file="ae.yaml")


def test_norm_float16_refused_on_cpu():
    with pytest.raises(CCELLAError, match="norm_float16"):
        build_autoencoder(AutoencoderConfig(num_channels=(8, 8, 8), norm_num_groups=4, num_splits=1,
                                            norm_float16=True), "cpu")


# ------------------------------------------------------------------------------------------------- encode / decode
def test_round_trip_shapes_and_posterior_mean():
    model = tiny_ae()
    ae = SequenceAutoencoder(model, "cpu", dtype=torch.float32)
    x = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(1))
    z = ae.encode(x)
    assert z.shape == (1, 4, 8, 8, 4) and z.dtype == torch.float32
    # The mean, not a random sample: deterministic and equal to mu of the posterior.
    assert torch.equal(z, ae.encode(x))
    mu, sigma = model.encode(x)
    assert torch.allclose(z, mu) and not torch.allclose(mu, mu + sigma * torch.randn_like(sigma))
    x_hat = ae.decode(z)
    assert x_hat.shape == (1, 1, 32, 32, 16) and x_hat.dtype == torch.float32
    both = ae.encode_sequences(torch.cat([x, 2 * x, 3 * x], dim=1))
    assert both.shape == (1, 12, 8, 8, 4) and torch.allclose(both[:, :4], z, atol=1e-5)
    assert torch.allclose(both[:, 8:], ae.encode(3 * x), atol=1e-5)
    assert ae.decode_sequences(both).shape == (1, 3, 32, 32, 16)


def test_encode_rejects_bad_shapes():
    ae = SequenceAutoencoder(tiny_ae(), "cpu", dtype=torch.float32)
    with pytest.raises(CCELLAError, match="divisible by 4"):
        ae.encode(torch.rand(1, 1, 30, 32, 16))
    with pytest.raises(CCELLAError, match=r"\(B, 1, X, Y, Z\)"):
        ae.encode(torch.rand(1, 2, 32, 32, 16))


# ---------------------------------------------------------------------------------------------------- MAISI weights
@pytest.mark.parametrize("layout", ["plain", "unet_state_dict", "state_dict_ddp", "safetensors"])
def test_load_maisi_format_weights(tmp_path, layout):
    source = tiny_ae(seed=1)
    state = source.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "ae.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "model_maisi_autoencoder.pt"
        payload = {
            "plain": state,
            "unet_state_dict": {"epoch": 273, "unet_state_dict": state},
            "state_dict_ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer_lr": 1e-4},
        }[layout]
        torch.save(payload, path)
    target = tiny_ae(seed=2)
    assert not _weights_equal(source, target)
    load_autoencoder_weights(target, path)
    assert _weights_equal(source, target)
    # Through the config, as a user would give it.
    built = build_autoencoder(AutoencoderConfig(**{**TINY.__dict__, "weights_path": path}), "cpu")
    assert _weights_equal(source, built)


def test_mismatched_weights_list_keys(tmp_path):
    other = tiny_ae(cfg=AutoencoderConfig(num_channels=(4, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=4,
                                          num_splits=1))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CCELLAError) as info:
        load_autoencoder_weights(tiny_ae(), path)
    message = str(info.value)
    assert str(path) in message and "shape-mismatched" in message
    assert "encoder.blocks.0.conv.conv.weight" in message  # the first conv: 4 vs 8 output channels
    partial = {k: v for k, v in tiny_ae().state_dict().items() if not k.startswith("decoder.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(CCELLAError, match=r"missing: decoder\..*unexpected: extra.weight"):
        load_autoencoder_weights(tiny_ae(), path)


def test_missing_and_malicious_weights_refused(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CCELLAError, match="nope.pt: weights file not found"):
        load_autoencoder_weights(tiny_ae(), missing)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, evil)  # a torch zip file whose pickle calls open()
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_Evil(marker), protocol=2))  # a bare pickle
    for path in (evil, raw):
        with pytest.raises(CCELLAError, match="refused") as info:
            load_autoencoder_weights(tiny_ae(), path)
        assert str(path) in str(info.value)
        assert not marker.exists()


# --------------------------------------------------------------------------------------------------- scale factors
def _latents(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.5] * 4 + [2.0] * 4 + [7.0] * 4).view(1, 12, 1, 1, 1)
    return torch.randn(n, 12, 4, 4, 2, generator=g) * scales + 3.0


def test_scale_factors_equal_dataset_std_and_ignore_chunking():
    data = _latents(0, 10)
    reference = {seq: 1.0 / data[:, 4 * i:4 * i + 4].double().std().item()
                 for i, seq in enumerate(("AxT2", "HighB", "ADC"))}
    results = []
    for chunks in ([10], [1] * 10, [3, 5, 2], [7, 3]):
        stats = LatentStats()
        for part in torch.split(data, chunks):
            stats.update(part)
        stats.all_reduce()  # no process group: no-op
        results.append(stats.scale_factors())
    for result in results:
        for seq, ref in reference.items():
            assert result[seq] == pytest.approx(ref, rel=1e-12)
    assert reference["ADC"] == pytest.approx(1 / 7, rel=0.1) and reference["AxT2"] == pytest.approx(2, rel=0.1)
    # Per-sequence updates give the same numbers.
    per_seq = LatentStats()
    for i, seq in enumerate(("AxT2", "HighB", "ADC")):
        per_seq.update_sequence(seq, data[:, 4 * i:4 * i + 4])
    assert per_seq.scale_factors()["HighB"] == pytest.approx(reference["HighB"], rel=1e-12)
    with pytest.raises(CCELLAError, match="at least 2 values"):
        LatentStats().scale_factors()
    with pytest.raises(CCELLAError, match=r"\(B, 12, \.\.\.\)"):
        LatentStats().update(data[:, :4])


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    data = _latents(0, 10)
    stats = LatentStats()
    stats.update(data[:3] if rank == 0 else data[3:])  # unequal shards
    stats.all_reduce()
    torch.save(stats.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_scale_factors_all_reduced_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "stats")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    data = _latents(0, 10)
    for rank in range(2):
        stats = LatentStats()
        stats.load_state_dict(torch.load(f"{out}.{rank}", weights_only=True))
        assert stats.count.tolist() == [data[:, :4].numel()] * 3
        assert stats.scale_factors()["ADC"] == pytest.approx(1.0 / data[:, 8:].double().std().item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------------- precision
def test_choose_dtype_from_cpu_capability_and_flags():
    assert choose_dtype("cpu", cpu_capability="AVX2") == torch.float32
    assert choose_dtype("cpu", cpu_capability="AVX2", cpu_flags={"avx2", "avx512_bf16"}) == torch.float32
    assert choose_dtype("cpu", cpu_capability="AVX512", cpu_flags={"avx2", "avx512f"}) == torch.float32
    assert choose_dtype("cpu", cpu_capability="AVX512", cpu_flags={"avx512f", "avx512_bf16"}) == torch.bfloat16
    assert choose_dtype("cpu", cpu_capability="AVX512", cpu_flags={"amx_bf16"}) == torch.bfloat16
    assert choose_dtype("cpu", cpu_capability="DEFAULT") == torch.float32
    if not torch.cuda.is_available():
        assert choose_dtype("cuda") == torch.float32
    assert choose_dtype("cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_autocast_context_and_device_description():
    with autocast_context("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    text = describe_device("cpu")
    assert text.startswith("CPU: ") and torch.backends.cpu.get_cpu_capability() in text
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        if names:
            assert names[0] in text
