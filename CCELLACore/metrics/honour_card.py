"""The outputs of ``ccella honour``: ``honour.json``, the Markdown section of a model card (gates first) and the card
update. The evaluation itself is :mod:`CCELLACore.metrics.honour`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import CCELLAError
from ..fileio import atomic_write_json, atomic_write_text
from .honour import SAMPLING_EXTRAS, _fmt, honour_gates
from .honour_cases import _GROUP_TITLES, GROUPS
from .honour_reference import AUTOENCODER_VARIANTS, VALIDITY_VARIANTS

__all__ = ["CARD_START", "CARD_END", "honour_markdown", "write_honour", "update_model_card"]

logger = logging.getLogger("CCELLACore")

CARD_START = "<!-- honour:start -->"
CARD_END = "<!-- honour:end -->"


def gates_markdown(result: dict[str, Any]) -> list[str]:
    """The gates table: one row per check."""
    lines = ["| Gate | Figure | Target | Met |", "|---|---|---|---|"]
    for gate in honour_gates(result):
        for check in gate["checks"]:
            met = {True: "yes", False: "**no**", None: "no exams"}[check["met"]]
            lines.append(f"| {gate['gate']}. {gate['name']} | {check['figure']} | {check['target']} | {met} |")
    return lines


def handwritten_markdown(result: dict[str, Any]) -> list[str]:
    """The hand-written reports' rows (:mod:`~CCELLACore.metrics.handwritten`), or nothing when they were skipped."""
    hw = result.get("handwritten")
    if not hw:
        return []
    h = hw["summary"]
    auc = h["auc_report"]["value"]
    return [
        "",
        f"Hand-written reports ({hw['n_reports']} short reports outside the phantom templates, "
        f"`CCELLACore/metrics/handwritten.py`; seeds 0-{hw['seeds'] - 1} each; not a gate):",
        "",
        "| Measure | Result |",
        "|---|---|",
        f"| Lesion found, PI-RADS >= 4 reports | {_fmt(h['pirads_4_5']['lesion_found'])} |",
        f"| Lesion found, PI-RADS 1-2 reports | {_fmt(h['pirads_1_2']['lesion_found'])} |",
        f"| Side right, detected PI-RADS >= 4 | {_fmt(h['side_correct_pirads_4_5'])} |",
        f"| Anatomy | {_fmt(h['anatomy'])} |",
        f"| Mean predicted csPCa probability, PI-RADS >= 4 / 1-2 reports | "
        f"{h['pirads_4_5']['mean_probability']} / {h['pirads_1_2']['mean_probability']} |",
        f"| Class AUC, PI-RADS >= 4 vs 1-2 reports | {'-' if auc is None else f'{auc:.3f}'} |",
    ]


def honour_markdown(result: dict[str, Any]) -> str:
    """The model card section (Markdown): the figures, the detector's validity and the settings."""
    s, summary = result["settings"], result["summary"]
    validity = result["detector_validity"]["summary"]

    def auc_text(auc: dict[str, Any]) -> str:
        if auc["value"] is None:
            return f"- (one class only: {auc['positives']} positive / {auc['negatives']} negative)"
        return f"{auc['value']:.3f} ({auc['positives']} positive / {auc['negatives']} negative)"

    def target(group: str) -> str:
        g = summary[group]
        if "target" not in g:
            return "reported separately"
        met = g["meets_target"]
        return f"{g['target']}: " + ("met" if met else "not met" if met is not None else "no exams")

    lines = [
        "## Report faithfulness",
        "",
        f"Generated from {s['n']} phantom reports of seed {s['seed']} (a seed not used in training); a fixed "
        "rule-based detector "
        "(bright on HighB and low on ADC against the gland, inside a gland atlas) decides whether a lesion appears.",
        "",
        *gates_markdown(result),
        "",
        "| Measure | Result | Target |",
        "|---|---|---|",
    ]
    for group in GROUPS:
        lines.append(f"| Lesion found, report {_GROUP_TITLES[group]} | {_fmt(summary[group]['lesion_found'])} | "
                     f"{target(group)} |")
    lines += [
        f"| Side of largest detection = side of report's index lesion | {_fmt(summary['side_correct'])} | - |",
        f"| ... of which report PI-RADS >= 4 | {_fmt(summary['side_correct_pirads_4_5'])} | - |",
        f"| Generated exams showing anatomy (every sequence r >= 0.5 with one real atlas exam) | "
        f"{_fmt(summary['anatomy'])} | all |",
        f"| Predicted csPCa probability vs report group (PI-RADS >= 4 vs 1-2), AUC | {auc_text(summary['auc_report'])} "
        "| >= 0.97 |",
        f"| Predicted csPCa probability vs label, AUC | {auc_text(summary['auc'])} | - |",
        *handwritten_markdown(result),
        "",
        "Detector on the real phantom exams of the same cases (same grid), before judging generated exams:",
        "",
        "| Representation, gland region | Sensitivity, PI-RADS >= 4 | False positives, PI-RADS 1-2 | Side correct |",
        "|---|---|---|---|",
    ]
    names = {"model": "as the model sees it (normalised)", "physical": "physical units",
             "autoencoder": "through the model's autoencoder (the ceiling of any generated exam)"}
    for representation, region in VALIDITY_VARIANTS + AUTOENCODER_VARIANTS:
        v = validity.get(f"{representation}_{region}")
        if v is None:
            continue
        lines.append(f"| {names[representation]}, {'gland atlas' if region == 'atlas' else 'own gland mask'} | "
                     f"{_fmt(v['sensitivity'])} | {_fmt(v['false_positive_rate'])} | {_fmt(v['side_correct'])} |")
    d = result["detector"]
    phantom_args = ""
    if s.get("phantom_size"):
        phantom_args += " --phantom-size " + " ".join(str(v) for v in s["phantom_size"])
    if s.get("phantom_spacing"):
        phantom_args += " --phantom-spacing " + " ".join(f"{v:g}" for v in s["phantom_spacing"])
    precision = {"float32": " --precision fp32", "bfloat16": " --precision bf16"}.get(s.get("precision", ""), "")
    lines += [
        "",
        "| Setting | Value |",
        "|---|---|",
        f"| Model hash (SHA-256 of weights) | `{s['model_hash']}` |",
        f"| Sampler, steps, guidance | {s['sampler']}, {s['steps']}, {s['guidance']:g} |",
        f"| Decoder (generated exams and the autoencoder ceiling) | {s.get('decoder', 'full')} |",
        *(["| Other sampling settings (the model's) | "
           + ", ".join(f"{key.replace('_', ' ')} {s[key]}" for key in SAMPLING_EXTRAS if key in s) + " |"]
          if any(key in s for key in SAMPLING_EXTRAS) else []),
        f"| Reports (N), phantom seed, institution | {s['n']}, {s['seed']}, {s['institution']} |",
        f"| Generation seeds | {s['generation_seeds']} |",
        f"| Gland atlas | {s['atlas_n']} exams of phantom seed {s['atlas_seed']}, "
        f"{result['atlas']['volume_cc']:g} cc |",
        f"| Output grid | {' x '.join(map(str, s['grid_size']))} voxels at "
        f"{' x '.join(f'{v:g}' for v in s['grid_spacing'])} mm |",
        f"| Detector thresholds | HighB >= {d['highb_ratio']:g} x gland median, ADC <= {d['adc_ratio']:g} x gland "
        f"median and <= {d['adc_max']:g}, >= {d['min_volume_mm3']:g} mm^3 |",
        f"| Machine | {s['machine']}; computed in {s.get('precision', 'the automatic precision')} |",
        f"| Wall time | {s['wall_time_s']:.1f} s |",
        "",
        "Reproduce: `ccella honour --model DIR "
        f"--n {s['n']} --seed {s['seed']} --atlas-seed {s['atlas_seed']} --atlas-n {s['atlas_n']} "
        f"--validation-seed {s['validation_seed']} "
        f"--steps {s['steps']} --sampler {s['sampler']} --guidance {s['guidance']:g}{phantom_args} "
        f"--handwritten-seeds {s.get('handwritten_seeds', 0)} --decoder {s.get('decoder', 'full')}{precision} "
        "--out OUT`.",
    ]
    return "\n".join(lines) + "\n"


def write_honour(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``honour.json`` and ``honour.md`` atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / "honour.json", result)
    md_path = atomic_write_text(out_dir / "honour.md", honour_markdown(result))
    return Path(json_path), Path(md_path)


def update_model_card(model_dir: str | Path, section: str) -> Path:
    """Put ``section`` between :data:`CARD_START` and :data:`CARD_END` in ``model_dir/README.md`` (appended with
    the markers when they are absent), atomically. The weights and ``model_hash`` do not change (checked).

    Raises:
        CCELLAError: no model directory, markers out of order, or the model hash changed (it must cover weights only).
    """
    from ..models.serialization import model_hash

    model_dir = Path(model_dir)
    card_path = model_dir / "README.md"
    before = model_hash(model_dir)
    text = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    block = f"{CARD_START}\n{section.rstrip()}\n{CARD_END}"
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(CARD_END):]
    elif start >= 0 or end >= 0:
        raise CCELLAError(f"{card_path}: found only one of {CARD_START} / {CARD_END}, or them out of order")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    logger.warning("updating the model card %s (the README only; weights and model hash are unchanged)", card_path)
    atomic_write_text(card_path, text)
    if model_hash(model_dir) != before:
        raise CCELLAError(f"{model_dir}: model_hash changed after editing README.md; it must cover weights only")
    return card_path
