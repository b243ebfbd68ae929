"""The phantom world's truth: case ids, random streams and :func:`sample_truth` (the institutions' profiles are
:mod:`~CCELLACore.data.phantom_institutions`).

Step 1 of a phantom case (step 2, the images, is :mod:`CCELLACore.data.phantoms`): what a radiologist and a
pathologist would know, drawn without painting a voxel: gland size, 0-3 lesions in named sectors (side, level, zone)
with PI-RADS 3-5, confounders (BPH, prostatitis, haemorrhage, cysts), PSA, case PI-RADS, ISUP when histopathology
exists, and the csPCa label via :func:`~CCELLACore.data.study.derive_label`. The gland-frame geometry here (ellipsoid
signed distance, TZ frame, sector rules) is what placing findings in named sectors needs; the renderer reuses it,
so masks and truth follow the same rules.

Images and reports are both written from this truth, so the imports go one way and this module imports neither:
``phantom_truth <- phantom_reports (report text) <- phantoms (images, PhantomCase)``.

World frame (LPS, mm): +x = patient left, +y = posterior, +z = superior. Every case draws from its own generator
``default_rng([seed, institution, index, stream])`` (0 patient anatomy, 1 findings, 2 patient structures outside the
gland, 3 AxT2, 4 DWI, 5 report, 7 patient grouping), so a case does not depend on which other cases are generated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .phantom_institutions import INSTITUTIONS, InstitutionProfile, get_institution
from .study import LabelSource, derive_label

__all__ = [
    "InstitutionProfile",
    "INSTITUTIONS",
    "get_institution",
    "LesionTruth",
    "ConfounderTruth",
    "CaseTruth",
    "phantom_ids",
    "sample_truth",
    "CSPCA_PROBABILITY",
]

#: P(csPCa | case PI-RADS), from published PI-RADS v2.1 cancer-detection rates.
CSPCA_PROBABILITY: dict[int, float] = {1: 0.03, 2: 0.05, 3: 0.15, 4: 0.5, 5: 0.8}
#: P(case PI-RADS); with CSPCA_PROBABILITY and ~75% histopathology, ~33% of cases are labelled positive.
_PIRADS_PRIOR = {1: 0.12, 2: 0.25, 3: 0.20, 4: 0.25, 5: 0.18}
#: P(histopathology known | case PI-RADS): biopsies follow suspicious MRI more often.
_HISTOPATHOLOGY_PROBABILITY = {1: 0.55, 2: 0.55, 3: 0.8, 4: 0.9, 5: 0.9}
_LEVELS = ("base", "mid", "apex")


# ----------------------------------------------------------------------------------------------------------------
# Truth
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LesionTruth:
    """One lesion as it is drawn and reported.

    ``center_lps`` is the lesion centre in world mm; ``side`` is "left" when it lies at larger LPS x than the gland
    centre. ``sector`` is the PI-RADS v2.1 sub-sector (PZpl, PZpm, PZa, TZa, TZp). ``diameter_mm`` is the longest
    axis, ``short_mm`` the shortest in-plane axis. ``adc`` is the lesion's ADC (10^-6 mm^2/s) before noise.
    """

    index: int
    side: str
    level: str
    zone: str
    sector: str
    diameter_mm: int
    short_mm: int
    pirads: int
    adc: float
    center_lps: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    rotation_deg: float
    epe: bool


@dataclass
class ConfounderTruth:
    """A benign finding that is not a lesion (prostatitis, haemorrhage, cyst, BPH nodule)."""

    kind: str
    side: str
    level: str
    zone: str
    size_mm: int
    center_lps: tuple[float, float, float]


@dataclass
class CaseTruth:
    """Everything known about a phantom case (written to ``truth.json``; drives the report and the images)."""

    case_id: str
    patient_id: str
    study_id: str
    institution: int
    b_value: int
    field_strength_t: float
    gland_center_lps: tuple[float, float, float]
    gland_semi_axes_mm: tuple[float, float, float]
    gland_volume_cc: float
    psa: float
    prior_biopsy: str
    lesions: list[LesionTruth]
    confounders: list[ConfounderTruth]
    bph_nodules: int
    pirads: int
    isup: int | None
    hidden_isup: int
    label: int | None
    label_source: str
    oblique_deg: float

    @property
    def psa_density(self) -> float:
        return self.psa / self.gland_volume_cc

    @property
    def confounder_kinds(self) -> list[str]:
        kinds = sorted({c.kind for c in self.confounders})
        return (["bph"] if self.bph_nodules >= 3 or self.gland_volume_cc >= 60 else []) + kinds

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["psa_density"] = round(self.psa_density, 3)
        data["confounders_present"] = self.confounder_kinds
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseTruth":
        # truth.json rows also carry derived keys (psa_density, split, ...): keep only the fields.
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["lesions"] = [LesionTruth(**{**d, "center_lps": tuple(d["center_lps"]), "semi_axes_mm": tuple(d["semi_axes_mm"])}) for d in data["lesions"]]
        data["confounders"] = [ConfounderTruth(**{**d, "center_lps": tuple(d["center_lps"])}) for d in data["confounders"]]
        data["gland_center_lps"] = tuple(data["gland_center_lps"])
        data["gland_semi_axes_mm"] = tuple(data["gland_semi_axes_mm"])
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------------
# Identity: patients, studies
# ----------------------------------------------------------------------------------------------------------------
def _stream(seed: int, institution: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(institution), int(index), int(stream)])


def _is_follow_up(index: int, institution: int, seed: int, multi_study_fraction: float) -> bool:
    # Case i is the second study of case i-1's patient when u_i < q <= u_{i-1}; this needs no recursion (so any
    # range of indices gives the same grouping) and P(patient has 2 studies) = q.
    if index <= 0 or multi_study_fraction <= 0:
        return False
    q = float(multi_study_fraction)
    u = lambda i: _stream(seed, institution, i, 7).random()  # noqa: E731
    return u(index) < q <= u(index - 1)


def phantom_ids(case_index: int, institution: int | str, seed: int, multi_study_fraction: float = 0.1) -> tuple[str, str, int]:
    """``(patient_id, study_id, patient_index)`` of a case, PI-CAI style (numeric ids, ``case_id = p_s``).

    About ``multi_study_fraction`` of patients have two studies (consecutive case indices).
    """
    inst = get_institution(institution).institution
    patient_index = case_index - 1 if _is_follow_up(case_index, inst, seed, multi_study_fraction) else case_index
    return f"{inst}{patient_index:05d}", f"{inst}{case_index:06d}", patient_index


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (local gland frame: u = x - gx (left +), v = y - gy (posterior +), w = z - gz (superior +))
# ----------------------------------------------------------------------------------------------------------------
def _ellipsoid_sdf(u, v, w, center, semi, rot_deg: float = 0.0):
    """Approximate signed distance (mm, negative inside) to a (z-rotated) ellipsoid (Quilez' bound)."""
    du, dv, dw = u - center[0], v - center[1], w - center[2]
    if rot_deg:
        c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
        du, dv = c * du + s * dv, -s * du + c * dv
    a, b, cc = semi
    k0 = np.sqrt((du / a) ** 2 + (dv / b) ** 2 + (dw / cc) ** 2)
    k1 = np.sqrt((du / a**2) ** 2 + (dv / b**2) ** 2 + (dw / cc**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _gland_frame(truth: CaseTruth):
    a, b, c = truth.gland_semi_axes_mm
    ft = float(np.clip(0.45 + 0.4 * (truth.gland_volume_cc - 20.0) / 80.0, 0.45, 0.85))
    tz_center = (0.0, -0.22 * b, 0.18 * c)
    tz_semi = (ft * a * 0.85, ft * b * 0.78, ft * c * 0.8)
    return (a, b, c), tz_center, tz_semi


def _sector_of(p, truth: CaseTruth) -> tuple[str, str, str, str]:
    """(side, level, zone, sub-sector) of a local point, by the same rules the label maps use."""
    (a, b, c), tz_center, tz_semi = _gland_frame(truth)
    u, v, w = p
    side = "left" if u > 0 else "right"
    level = "base" if w > c / 3 else ("apex" if w < -c / 3 else "mid")
    in_tz = float(_ellipsoid_sdf(np.array(u), np.array(v), np.array(w), tz_center, tz_semi)) < 0
    if in_tz:
        zone, sector = "TZ", "TZa" if v < tz_center[1] else "TZp"
    else:
        zone = "PZ"
        sector = "PZa" if v < -0.25 * b else ("PZpl" if abs(u) > 0.45 * a else "PZpm")
    return side, level, zone, sector


# ----------------------------------------------------------------------------------------------------------------
# Step 1: truth
# ----------------------------------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, table: dict) -> Any:
    keys = list(table)
    p = np.array([table[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_truth(
    case_index: int,
    institution: int | str = 1,
    seed: int = 0,
    *,
    multi_study_fraction: float = 0.1,
) -> CaseTruth:
    """Draw a case's truth (no images): cheap, deterministic in ``(seed, institution, case_index)``.

    A patient's anatomy (gland size and shape, PSA baseline) comes from the patient's generator, so the two studies
    of a patient share a gland; findings come from the study's own generator.
    """
    profile = get_institution(institution)
    inst = profile.institution
    patient_id, study_id, patient_index = phantom_ids(case_index, inst, seed, multi_study_fraction)
    anatomy_rng = _stream(seed, inst, patient_index, 0)
    rng = _stream(seed, inst, case_index, 1)

    # Gland: 85% 20-80 cc, 15% BPH 80-130 cc; ellipsoid volume 4/3 pi abc.
    if anatomy_rng.random() < 0.15:
        volume_cc = float(anatomy_rng.uniform(80.0, 130.0))
    else:
        volume_cc = float(np.clip(anatomy_rng.lognormal(math.log(40.0), 0.35), 20.0, 80.0))
    ratios = np.array([1.35, 1.0, 1.15]) * anatomy_rng.uniform(0.92, 1.08, 3)
    scale = (volume_cc * 1000.0 / (4.0 / 3.0 * math.pi * ratios.prod())) ** (1.0 / 3.0)
    semi = tuple(float(round(r * scale, 2)) for r in ratios)
    gland_center = tuple(float(round(x, 2)) for x in anatomy_rng.uniform(-5.0, 5.0, 3))
    psa_base = 0.1 * volume_cc * anatomy_rng.lognormal(0.0, 0.35)

    pirads = int(_choice(rng, _PIRADS_PRIOR))
    cspca = rng.random() < CSPCA_PROBABILITY[pirads]
    if cspca:
        weights = {2: 0.3, 3: 0.3, 4: 0.2, 5: 0.2} if pirads == 5 else {2: 0.55, 3: 0.3, 4: 0.1, 5: 0.05}
        hidden_isup = int(_choice(rng, weights))
    else:
        hidden_isup = 1 if rng.random() < (0.4 if pirads >= 3 else 0.2) else 0
    isup = hidden_isup if rng.random() < _HISTOPATHOLOGY_PROBABILITY[pirads] else None
    label, source = derive_label(isup, pirads)
    psa = float(round(psa_base + (rng.lognormal(math.log(3.0), 0.6) if cspca else 0.0), 1))
    prior_biopsy = str(_choice(rng, {"naive": 0.55, "negative": 0.25, "surveillance": 0.2 if hidden_isup >= 1 else 0.0}))

    truth = CaseTruth(
        case_id=f"{patient_id}_{study_id}",
        patient_id=patient_id,
        study_id=study_id,
        institution=inst,
        b_value=int(profile.b_values[int(rng.integers(len(profile.b_values)))]),
        field_strength_t=profile.field_strength_t,
        gland_center_lps=gland_center,
        gland_semi_axes_mm=semi,
        gland_volume_cc=float(round(volume_cc, 1)),
        psa=max(psa, 0.2),
        prior_biopsy=prior_biopsy,
        lesions=[],
        confounders=[],
        bph_nodules=0,
        pirads=pirads,
        isup=isup,
        hidden_isup=hidden_isup,
        label=label,
        label_source=LabelSource(source).value,
        oblique_deg=float(round(rng.uniform(*profile.oblique_deg), 2)) if profile.oblique_deg[1] > 0 else 0.0,
    )

    # Lesions: the index lesion carries the case score; others score 3..case score.
    if pirads >= 3:
        n = int(_choice(rng, {1: 0.7, 2: 0.22, 3: 0.08}))
        scores = sorted([pirads] + [int(rng.integers(3, pirads + 1)) for _ in range(n - 1)], reverse=True)
        for score in scores:
            lesion = _place_lesion(rng, truth, score)
            if lesion is not None:
                truth.lesions.append(lesion)
        if not truth.lesions:  # cannot happen for sane glands; keep truth and images consistent anyway
            truth.pirads = 2
            truth.label, src = derive_label(truth.isup, 2)
            truth.label_source = LabelSource(src).value

    # Confounders (not lesions).
    (a, b, c), tz_center, tz_semi = _gland_frame(truth)
    tz_volume = 4.0 / 3.0 * math.pi * np.prod(tz_semi) / 1000.0
    truth.bph_nodules = int(np.clip(rng.poisson(tz_volume / 6.0), 0, 10))
    for kind, p in (("prostatitis", 0.25 if pirads <= 3 else 0.12), ("haemorrhage", 0.25 if prior_biopsy != "naive" else 0.05), ("cyst", 0.15)):
        if rng.random() < p:
            conf = _place_confounder(rng, truth, kind)
            if conf is not None:
                truth.confounders.append(conf)
    return truth


def _to_lps(truth: CaseTruth, p) -> tuple[float, float, float]:
    return tuple(float(round(g + x, 2)) for g, x in zip(truth.gland_center_lps, p))  # type: ignore[return-value]


def _to_local(truth: CaseTruth, lps) -> np.ndarray:
    return np.asarray(lps, float) - np.asarray(truth.gland_center_lps, float)


def _place_lesion(rng: np.random.Generator, truth: CaseTruth, score: int) -> LesionTruth | None:
    (a, b, c), tz_center, tz_semi = _gland_frame(truth)
    zone = "PZ" if rng.random() < 0.7 else "TZ"
    side = 1.0 if rng.random() < 0.5 else -1.0
    level = str(_choice(rng, {"base": 0.25, "mid": 0.45, "apex": 0.30}))
    diameter = {3: rng.uniform(6.0, 11.0), 4: rng.uniform(8.0, 14.0), 5: rng.uniform(15.0, 24.0)}[score]
    for attempt in range(400):
        if attempt and attempt % 100 == 0:  # relax the request: another level, then zone, then smaller
            level = _LEVELS[(attempt // 100) % 3]
            zone = zone if attempt < 200 else ("TZ" if zone == "PZ" else "PZ")
            diameter = max(diameter * 0.85, 15.0 if score == 5 else 5.0)
        r = diameter / 2.0
        w_band = {"base": (c / 3 + 1, 0.75 * c), "mid": (-c / 3 + 1, c / 3 - 1), "apex": (-0.75 * c, -c / 3 - 1)}[level]
        p = np.array([side * rng.uniform(0.08 * a, 0.8 * a), rng.uniform(-0.85 * b, 0.85 * b), rng.uniform(*w_band)])
        gland_sdf = float(_ellipsoid_sdf(*p, (0, 0, 0), (a, b, c)))
        tz_sdf = float(_ellipsoid_sdf(*p, tz_center, tz_semi))
        # PI-RADS 5 may break the capsule (EPE); lower scores stay inside it.
        if score == 5 and zone == "PZ":
            if not -r * 1.1 < gland_sdf < -0.2 * r:
                continue
        elif gland_sdf > -r - 1.0:
            continue
        if zone == "PZ" and tz_sdf < 0.3 * r:
            continue
        if zone == "TZ" and tz_sdf > -0.3 * r:
            continue
        if any(np.linalg.norm(p - _to_local(truth, o.center_lps)) < r + o.diameter_mm / 2 + 2 for o in truth.lesions):
            continue
        s_side, s_level, s_zone, sector = _sector_of(p, truth)
        adc = {3: 900.0, 4: 790.0, 5: 690.0}[score] - 30.0 * max(truth.hidden_isup - 1, 0) + rng.normal(0, 25)
        semi = (r, r * rng.uniform(0.65, 0.8), r * rng.uniform(0.8, 0.95))
        return LesionTruth(
            index=len(truth.lesions) + 1,
            side=s_side,
            level=s_level,
            zone=s_zone,
            sector=sector,
            diameter_mm=int(round(diameter)),
            short_mm=int(round(2 * semi[1])),
            pirads=score,
            adc=float(round(np.clip(adc, 580.0, 960.0), 1)),
            center_lps=_to_lps(truth, p),
            semi_axes_mm=tuple(float(round(s, 2)) for s in semi),  # type: ignore[arg-type]
            rotation_deg=float(round(rng.uniform(-30, 30), 1)),
            epe=gland_sdf + r > 1.0,
        )
    return None


def _place_confounder(rng: np.random.Generator, truth: CaseTruth, kind: str) -> ConfounderTruth | None:
    (a, b, c), tz_center, tz_semi = _gland_frame(truth)
    size = {"prostatitis": rng.uniform(10.0, 18.0), "haemorrhage": rng.uniform(8.0, 14.0), "cyst": rng.uniform(4.0, 8.0)}[kind]
    for _ in range(300):
        p = np.array([rng.uniform(-0.8 * a, 0.8 * a), rng.uniform(-0.6 * b, 0.85 * b), rng.uniform(-0.7 * c, 0.7 * c)])
        if kind == "cyst" and rng.random() < 0.5:
            p[0] = rng.uniform(-2.0, 2.0)  # midline utricle cyst
        gland_sdf = float(_ellipsoid_sdf(*p, (0, 0, 0), (a, b, c)))
        tz_sdf = float(_ellipsoid_sdf(*p, tz_center, tz_semi))
        if gland_sdf > -size / 2 - 1.0:
            continue
        if kind in ("prostatitis", "haemorrhage") and tz_sdf < 2.0:
            continue  # PZ findings
        if any(np.linalg.norm(p - _to_local(truth, o.center_lps)) < size / 2 + o.diameter_mm / 2 + 4 for o in truth.lesions):
            continue
        side, level, zone, _ = _sector_of(p, truth)
        if kind == "cyst" and abs(p[0]) < 2.5:
            side = "midline"
        return ConfounderTruth(kind, side, level, zone, int(round(size)), _to_lps(truth, p))
    return None
