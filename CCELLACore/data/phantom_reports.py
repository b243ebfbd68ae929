"""Radiology reports for phantom cases, written from the case truth with varied templates and phrasings.

Every stated fact is the truth's: lesion side, level, zone, sector, size and PI-RADS; gland volume, PSA and PSA
density; confounders (BPH, prostatitis, haemorrhage, cysts), EPE; the overall category. What varies is the wording
("PI-RADS 4", "PIRADS 4/5", "category 4", "v2.1 score 4"), units (mm or cm), abbreviations (PZ, TZ, EPE, SVI),
section order, negations and non-ASCII symbols (µ, ≥, ×) as in real reports. About 10% of reports are empty.

A report is written from the case truth alone (:mod:`~CCELLACore.data.phantom_truth`), never from the images:
this module imports phantom_truth only, and :mod:`~CCELLACore.data.phantoms` (the renderer) imports this one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .phantom_truth import CaseTruth, ConfounderTruth, LesionTruth

__all__ = ["write_report", "EMPTY_REPORT_PROBABILITY", "BRIEF_REPORT_PROBABILITY", "score_phrase", "sector_phrase"]

#: Fraction of cases without a report (they train the unconditional branch).
EMPTY_REPORT_PROBABILITY = 0.1
#: Fraction of the other reports written briefly, as people type them: the lesion (or no-lesion) sentences and the
#: impression only, no indication, technique or gland volume ("Lt TZ anterior 12mm lesion, low T2, bright on DWI.
#: PI-RADS 4."). Without them a model met only long templated reports and misread short hand-written ones.
BRIEF_REPORT_PROBABILITY = 0.25

_ZONE_WORDS = {"PZ": ("peripheral zone", "PZ"), "TZ": ("transition zone", "TZ")}
_LEVEL_WORDS = {"base": ("base", "basal", "base"), "mid": ("mid gland", "midgland", "mid"), "apex": ("apex", "apical", "apex")}
_SECTOR_WORDS = {
    "PZpl": "posterolateral",
    "PZpm": "posteromedial",
    "PZa": "anterior horn",
    "TZa": "anterior",
    "TZp": "posterior",
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def score_phrase(score: int, rng: np.random.Generator) -> str:
    """One of the real-world ways to write a PI-RADS category, e.g. "PI-RADS 4", "PIRADS 4/5", "category 4"."""
    return _pick(
        rng,
        (
            f"PI-RADS {score}",
            f"PIRADS {score}/5",
            f"PI-RADS category {score}",
            f"category {score}",
            f"PI-RADS v2.1 score {score}",
            f"v2.1 score {score}",
            f"PI-RADS: {score}",
            f"PI-RADS {score} of 5",
            f"PI RADS {score}",
            f"PI-RADS={score}",
            f"PI-RADS score: {score}",
            f"PIRADS {score}",
        ),
    )


def sector_phrase(side: str, level: str, zone: str, sector: str, rng: np.random.Generator) -> str:
    """The lesion location in words or abbreviations, e.g. "left mid peripheral zone" or "L apex PZpl"."""
    level_word = _pick(rng, _LEVEL_WORDS[level])
    zone_long, zone_short = _ZONE_WORDS[zone]
    side_short = "L" if side == "left" else "R"
    side_abbr = _pick(rng, ("Lt", "Lt.", "left-sided")) if side == "left" else _pick(rng, ("Rt", "Rt.", "right-sided"))
    style = int(rng.integers(8))
    if style == 0:
        return f"{side} {level_word} {zone_long}"
    if style == 1:
        return f"{side} {level_word} {zone_short}, {_SECTOR_WORDS[sector]}"
    if style == 2:
        return f"{side_short} {level} {sector}"
    if style == 3:
        return f"{_SECTOR_WORDS[sector]} {zone_long}, {side} {_LEVEL_WORDS[level][0]}"
    if style == 4:
        return f"{zone_short} ({side}, {level_word})"
    if style == 5:  # as people type it: "Lt TZ anterior"
        return f"{side_abbr} {zone_short} {_SECTOR_WORDS[sector]}"
    if style == 6:
        return f"{side} {_SECTOR_WORDS[sector]} {zone_long} at the {level_word}"
    return f"{level_word} {zone_short}, {side_abbr}"


def _size_phrase(lesion: LesionTruth, rng: np.random.Generator) -> str:
    d, s = lesion.diameter_mm, lesion.short_mm
    return _pick(
        rng,
        (
            f"{d} mm",
            f"{d / 10:.1f} cm",
            f"{d} x {s} mm",
            f"{d}×{s} mm",
            f"{d / 10:.1f} × {s / 10:.1f} cm",
            f"measuring {d} mm",
            f"{d}mm",
            f"{d / 10:.1f}cm",
            f"approx. {d} mm",
        ),
    )


def _lesion_sentence(truth: CaseTruth, lesion: LesionTruth, rng: np.random.Generator) -> str:
    where = sector_phrase(lesion.side, lesion.level, lesion.zone, lesion.sector, rng)
    size = _size_phrase(lesion, rng)
    b = truth.b_value
    adc = int(round(lesion.adc / 10.0) * 10)
    t2_desc = (
        _pick(rng, ("lenticular T2 hypointense", "ill-defined homogeneous T2 dark", "erased-charcoal T2 hypointense",
                    "low T2 signal", "T2 hypointense", "low T2"))
        if lesion.zone == "TZ"
        else _pick(rng, ("focal T2 hypointense", "round T2 dark", "focal low T2 signal", "low T2 signal", "low T2"))
    )
    dwi = _pick(
        rng,
        (
            "with restricted diffusion",
            f"bright on b{b} and dark on ADC",
            f"with marked restriction (ADC ~{adc} µm²/s)",
            f"hyperintense on high b-value (b{b}) DWI, hypointense on ADC ({adc} ×10^-6 mm²/s)",
            "showing restricted diffusion, dark on the ADC map",
            "bright on DWI",
            "DWI bright, ADC dark",
            "restricts on DWI/ADC",
            f"high signal on b{b}, low ADC",
            "marked diffusion restriction",
        ),
    )
    if lesion.pirads == 3:
        dwi = _pick(rng, ("with mild/moderate restricted diffusion", f"mildly bright on b{b}, moderately dark on ADC ({adc} µm²/s)",
                          "with focal mild-to-moderate restriction", "mildly bright on DWI", "mild restriction on ADC"))
    score = score_phrase(lesion.pirads, rng)
    label = _pick(rng, (f"Lesion {lesion.index}", "Index lesion" if lesion.index == 1 else f"Lesion {lesion.index}", f"#{lesion.index}"))
    epe = ""
    if lesion.epe:
        epe = " " + _pick(rng, ("Definite extraprostatic extension (EPE).", "Capsular bulge with EPE.", "Broad capsular contact with extraprostatic extension."))
    elif rng.random() < 0.5:
        epe = " " + _pick(rng, ("No EPE.", "No extraprostatic extension.", "Capsule intact."))
    form = int(rng.integers(5))
    if form == 0:
        text = f"{label}: {size} {t2_desc} lesion in the {where}, {dwi}. {score}."
    elif form == 1:
        text = f"{label}: {where}. {t2_desc[0].upper() + t2_desc[1:]} focus, {size}, {dwi}. Assessment: {score}."
    elif form == 2:
        text = f"{score[0].upper() + score[1:]} lesion in the {where} ({size}), {t2_desc}, {dwi}."
    elif form == 3:  # unlabelled, as in short reports
        text = f"{size} lesion in the {where}, {t2_desc}, {dwi}. {score}."
    else:
        text = f"{where[0].upper() + where[1:]} {size} lesion, {t2_desc}, {dwi}. {score}."
    return text + epe


def _confounder_sentence(conf: ConfounderTruth, rng: np.random.Generator) -> str:
    side = "midline" if conf.side == "midline" else conf.side
    where = f"{side} {_pick(rng, _LEVEL_WORDS[conf.level])} {_ZONE_WORDS[conf.zone][_pick(rng, (0, 1))]}"
    if conf.kind == "prostatitis":
        return _pick(
            rng,
            (
                f"Wedge-shaped band-like T2 hypointensity in the {where} without restricted diffusion, in keeping with prostatitis (PI-RADS 2).",
                f"Ill-defined non-mass low T2 signal in the {where}, mildly low ADC, not bright on high b: likely prostatitis.",
            ),
        )
    if conf.kind == "haemorrhage":
        return _pick(
            rng,
            (
                f"Post-biopsy haemorrhage in the {where}.",
                f"Small area of hemorrhage ({conf.size_mm} mm) in the {where}, no restricted diffusion.",
            ),
        )
    return _pick(
        rng,
        (
            f"Simple cyst of {conf.size_mm} mm in the {where}." if side != "midline" else f"Midline utricular cyst ({conf.size_mm} mm).",
            f"{conf.size_mm} mm T2-bright cyst ({side}), no restriction.",
        ),
    )


def write_report(truth: CaseTruth | dict[str, Any], rng: np.random.Generator) -> str:
    """A free-text bpMRI report consistent with ``truth`` (``""`` for ~10% of cases: no report available).

    Args:
        truth: a :class:`~CCELLACore.data.phantom_truth.CaseTruth` (or its ``to_dict()``).
        rng: the case's own generator (the wording is random, the facts are not).
    """
    if isinstance(truth, dict):
        truth = CaseTruth.from_dict(truth)
    if rng.random() < EMPTY_REPORT_PROBABILITY:
        return ""

    # Indication.
    biopsy = {
        "naive": _pick(rng, ("biopsy-naive", "no prior biopsy")),
        "negative": _pick(rng, ("prior negative biopsy", "previous negative TRUS biopsy")),
        "surveillance": _pick(rng, ("on active surveillance for low-grade disease", "active surveillance (prior ISUP 1)")),
    }[truth.prior_biopsy]
    indication = _pick(
        rng,
        (
            f"INDICATION: Elevated PSA {truth.psa:.1f} ng/mL, {biopsy}.",
            f"Clinical history: PSA {truth.psa:.1f} ng/ml; {biopsy}.",
            f"Indication: raised PSA ({truth.psa:.1f}), {biopsy}. Query prostate cancer.",
        ),
    )
    # Technique.
    field = f"{truth.field_strength_t:g}T"
    technique = _pick(
        rng,
        (
            f"TECHNIQUE: Biparametric MRI of the prostate at {field}: axial, sagittal and coronal T2W, DWI (b50/800, calculated b{truth.b_value}) with ADC map.",
            f"Technique: {field} bpMRI, T2-weighted and diffusion-weighted imaging (high b-value b{truth.b_value}), no contrast.",
            f"Protocol: multiplanar T2, axial DWI with ADC and b={truth.b_value} s/mm², {field} pelvic phased-array coil.",
        ),
    )

    # Findings.
    volume = truth.gland_volume_cc
    a, b, c = (2 * x / 10.0 for x in truth.gland_semi_axes_mm)
    psad = truth.psa_density
    gland = _pick(
        rng,
        (
            f"Prostate volume {volume:.0f} cc. PSA density {psad:.2f} ng/mL/cc.",
            f"The gland measures {a:.1f} × {b:.1f} × {c:.1f} cm (volume ≈ {volume:.0f} mL); PSAD {psad:.2f}" + (" (≥ 0.15)." if psad >= 0.15 else "."),
            f"Gland volume: {volume:.1f} cc, PSA density {psad:.2f}.",
        ),
    )
    findings: list[str] = [gland]
    kinds = truth.confounder_kinds
    if "bph" in kinds:
        findings.append(_pick(rng, ("Enlarged transition zone with multiple encapsulated BPH nodules.", "TZ hypertrophy with typical BPH nodules (PI-RADS 1).", "Benign prostatic hyperplasia: heterogeneous TZ with round circumscribed nodules.")))
    else:
        findings.append(_pick(rng, ("TZ: unremarkable, few small nodules.", "Transition zone of normal size.", "Normal transition zone.")))
    if not truth.lesions:
        focal = [
            _pick(
                rng,
                (
                    "No focal lesion. No restricted diffusion.",
                    "No focal area of restricted diffusion." if truth.confounders else "PZ: homogeneous high T2 signal, no focal area of restricted diffusion.",
                    "No suspicious focal lesion in the peripheral or transition zone.",
                    "No focal abnormality; no restricted diffusion on DWI/ADC.",
                    "No suspicious lesion (nothing PI-RADS 3 or above).",
                    "No focal lesion seen.",
                ),
            )
        ]
    else:
        focal = [_pick(rng, (f"{len(truth.lesions)} suspicious lesion(s):", "Focal lesions:", "")).strip()]
        focal.extend(_lesion_sentence(truth, lesion, rng) for lesion in truth.lesions)
        if rng.random() < 0.5:
            focal.append(_pick(rng, ("No other suspicious lesion.", "Remainder of the PZ unremarkable.")))
    focal.extend(_confounder_sentence(conf, rng) for conf in truth.confounders)
    findings.extend(focal)
    extra = [
        _pick(rng, ("Seminal vesicles unremarkable.", "No SVI.", "No seminal vesicle invasion.")),
        _pick(rng, ("No suspicious lymph nodes.", "No pelvic lymphadenopathy.")),
        _pick(rng, ("No suspicious bone lesions.", "Bones: no focal lesion.")),
    ]
    findings.extend(extra[: int(rng.integers(1, 4))])
    findings = [f for f in findings if f]
    if rng.random() < 0.3:  # some readers list the gland volume last
        findings = findings[1:] + findings[:1]
    findings_text = _pick(rng, ("FINDINGS:", "Findings:", "Report:")) + " " + " ".join(findings)

    # Impression.
    overall = score_phrase(truth.pirads, rng)
    if truth.lesions:
        index = truth.lesions[0]
        where = sector_phrase(index.side, index.level, index.zone, index.sector, rng)
        summary = f"{overall}: {_pick(rng, ('index lesion', 'dominant lesion', 'suspicious lesion'))} in the {where}."
        if len(truth.lesions) > 1:
            summary += f" {len(truth.lesions) - 1} additional lesion(s) as above."
        rec = _pick(rng, ("Recommend MRI-targeted biopsy.", "Targeted biopsy recommended.", "MRI/US fusion biopsy advised."))
        if truth.pirads == 3:
            rec = _pick(rng, ("Consider targeted biopsy or PSA density guided follow-up.", "Equivocal; MDT discussion / biopsy to be considered."))
    else:
        summary = f"{overall}. " + _pick(rng, ("Clinically significant cancer unlikely.", "No suspicious lesion.", "Low likelihood of csPCa."))
        rec = _pick(rng, ("PSA follow-up.", "No biopsy indicated; clinical follow-up.", "Routine surveillance."))
    impression = _pick(rng, ("IMPRESSION:", "Impression:", "Conclusion:", "Overall:")) + f" {summary} {rec}"

    if rng.random() < BRIEF_REPORT_PROBABILITY:
        return _brief_report([f for f in focal[1:] if f] if truth.lesions else focal, impression, rng)
    sections = [indication, technique, findings_text, impression]
    order = int(rng.integers(4))
    if order == 1:
        sections = [technique, indication, findings_text, impression]
    elif order == 2:
        sections = [impression, indication, technique, findings_text]
    elif order == 3:
        sections = [indication, findings_text, impression]  # technique omitted
    return _pick(rng, ("\n", "\n\n", " ")).join(sections)


def _brief_report(focal: list[str], impression: str, rng: np.random.Generator) -> str:
    """The lesion (or no-lesion) and confounder sentences and the impression, nothing else."""
    return (_pick(rng, ("Findings: ", "", "MRI prostate: ")) + " ".join(focal) + _pick(rng, ("\n", " ")) + impression)
