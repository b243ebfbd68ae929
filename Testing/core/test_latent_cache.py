"""Paper-scale training data: fp16 caches read per batch through memory maps, each rank reading only its share;
training restricted to one institution; world size, global batch and the real step count recorded with the run."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from CCELLACore.cli import main
from CCELLACore.data.manifest import read_manifest
from CCELLACore.errors import DataError
from CCELLACore.models.encode_cli import EncodingCache
from CCELLACore.settings import load_config
from CCELLACore.training.distributed import DistributedContext
from CCELLACore.models.autoencoder import LatentStats
from CCELLACore.training.latents import latent_stats, load_latent_data
from CCELLACore.training.ldm import latent_batch, train_ldm


def _dtype(path, key):
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key).get_dtype()


def _train_data(data, trained, cache_root=None):
    cache = (cache_root or trained.parent / "cache")
    studies = read_manifest(data / "prep" / "manifest.csv").select(("train",))
    return load_latent_data(studies, cache / "latents", EncodingCache(cache / "text")), studies


def test_caches_are_half_precision_on_disk(trained):
    latent_files = sorted((trained.parent / "cache" / "latents").glob("*.safetensors"))
    text_files = sorted((trained.parent / "cache" / "text").glob("*.safetensors"))
    assert len(latent_files) >= 6 and len(text_files) >= 6
    assert {(_dtype(p, "latent"), _dtype(p, "lesion")) for p in latent_files} == {("F16", "F16")}
    assert {_dtype(p, "features") for p in text_files} == {"F16"}


def test_batches_read_the_cached_values(data, trained):
    train, studies = _train_data(data, trained)
    cache = EncodingCache(trained.parent / "cache" / "text")
    held = sum(t.numel() * t.element_size() for t in vars(train).values() if isinstance(t, torch.Tensor))
    assert held <= 64 * len(train)  # records only (spacing, labels, flags, token counts): no latents, no features
    batch = train.read([2, 0])
    assert batch.latents.dtype == torch.float32 and batch.latents.shape == (2, *train.latent_shape)
    with safe_open(str(train.latent_files[0]), framework="pt") as f:
        assert torch.equal(batch.latents[1], f.get_tensor("latent").float())
    longest = int(train.text_lengths[[2, 0]].max())
    assert batch.text.features.shape[1] == longest  # padded to the batch's longest report, not to 256 tokens
    for row, i in enumerate((2, 0)):
        n = int(train.text_lengths[i])
        full = cache.load(studies[i].case_id, cache.max_tokens) if studies[i].has_report else cache.load_null(256)
        assert torch.equal(batch.text.features[row, :n], full.features[0, :n])
        assert batch.text.mask[row].sum() == n


def test_a_rank_reads_only_its_share(data, trained, tmp_path):
    """Rank 0 of 2 trains on an epoch with every other exam's files deleted: it never needs them."""
    shutil.copytree(trained.parent / "cache", tmp_path / "cache")
    train, studies = _train_data(data, trained, tmp_path / "cache")
    steps = math.ceil(len(train) / 2)  # one epoch at batch 1 per rank, world size 2
    shares = [set(), set()]
    for step in range(steps):
        global_index = latent_batch(train, step, 1, 2, seed=0)
        for rank in (0, 1):
            shares[rank].update(global_index[rank::2].tolist())
    assert shares[0] | shares[1] == set(range(len(train))) and len(shares[0]) <= steps
    others = sorted(set(range(len(train))) - shares[0])
    assert others
    for i in others:
        train.latent_files[i].unlink()
        if train.text_files[i].name != "null.safetensors":
            train.text_files[i].unlink()
    for step in range(steps):
        assert train.read(latent_batch(train, step, 1, 2, seed=0)[0::2]).latents.shape[0] == 1
    with pytest.raises(DataError, match=studies[others[0]].case_id):
        train.read([others[0]])


def test_scale_factor_statistics_merge_over_rank_shares(data, trained):
    """Each rank streams its share; merged, the shares give the single-process statistics."""
    train, _ = _train_data(data, trained)
    seqs = ("AxT2", "HighB", "ADC")
    single = latent_stats(train, seqs, DistributedContext())
    parts = [latent_stats(train, seqs, DistributedContext(rank=r, world_size=2)) for r in (0, 1)]
    merged = LatentStats(seqs)
    for part in parts:
        for i, _ in enumerate(seqs):
            merged._merge(i, part.count[i].item(), part.mean[i].item(), part.m2[i].item())
    assert parts[0].count[0] < single.count[0]
    for seq in seqs:
        assert merged.std()[seq] == pytest.approx(single.std()[seq], rel=1e-12)


def _two_institution_manifest(data, tmp_path):
    """The prepared phantoms with the last three rows moved to institution 2."""
    source = data / "prep" / "manifest.csv"
    with source.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[-3:]:
        row["institution"] = "2"
    for row in rows:  # absolute paths: the copy lives elsewhere
        for col in ("axt2", "highb", "adc", "gland_mask", "lesion_mask"):
            if row[col]:
                row[col] = str((source.parent / row[col]).resolve())
    path = tmp_path / "two_institutions.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def test_train_ldm_on_one_institution_records_the_run(data, trained, tmp_path):
    manifest, rows = _two_institution_manifest(data, tmp_path)
    inst1_train = [r for r in rows if r["institution"] == "1" and r["split"] == "train"]
    run = tmp_path / "run"
    shutil.copytree(trained.parent / "cache", run / "cache")  # reuse the encodings
    config = load_config("tiny")
    config = replace(config, train_ldm=replace(config.train_ldm, max_steps=0, epochs=2))
    model = train_ldm(config, manifest, data / "ae", run, device="cpu", progress=False, institution="1")
    extra = json.loads((model / "model.json").read_text())["extra"]
    steps = 2 * math.ceil(len(inst1_train) / 2)  # epochs x ceil(N / global batch), N of institution 1 only
    assert extra["train_exams"] == len(inst1_train) and extra["institution"] == "1"
    assert (extra["world_size"], extra["batch_size_per_process"], extra["global_batch"]) == (1, 2, 2)
    assert extra["steps"] == steps and extra["steps_per_epoch"] == steps // 2
    with (run / "metrics.csv").open(encoding="utf-8") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]
    assert lrs == pytest.approx([1e-3 * (1 - s / steps) ** 2 for s in range(steps)], rel=1e-6)


def test_train_autoencoder_on_one_institution(data, tmp_path, capsys):
    manifest, rows = _two_institution_manifest(data, tmp_path)
    inst2_train = [r for r in rows if r["institution"] == "2" and r["split"] == "train"]
    args = ["train-autoencoder", "--config", "tiny", "--manifest", str(manifest), "--max-steps", "2",
            "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "ae"), "--institution", "2"]) == 0
    extra = json.loads((tmp_path / "ae" / "model" / "model.json").read_text())["extra"]
    assert extra["train_exams"] == len(inst2_train) and extra["institution"] == "2"
    assert (extra["world_size"], extra["global_batch"]) == (1, 2)
    assert main([*args, "--out", str(tmp_path / "none"), "--institution", "9"]) == 1
    err = capsys.readouterr().err
    assert "institution '9'" in err and "['1', '2']" in err
