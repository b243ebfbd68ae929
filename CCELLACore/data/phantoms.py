"""The phantom world: procedural biparametric prostate MRI exams with known truth.

No public prostate MRI can be downloaded here, so tests, the demo model and a miniature of the paper's
domain-adaptation study use these phantoms. Each case is drawn in two steps:

1. :func:`sample_truth` draws what a radiologist and a pathologist would know (cheap, no images): gland size, 0-3
   lesions in named sectors (side, level, zone) with PI-RADS 3-5, confounders (BPH, prostatitis, haemorrhage,
   cysts), PSA, case PI-RADS, ISUP when histopathology exists, and the csPCa label via :func:`derive_label`.
2. :func:`render_case` paints the anatomy (body, fat, muscles, bones, bladder, rectum, seminal vesicles, PZ/TZ,
   BPH nodules, urethra, confounders, lesions) as smooth analytic shapes evaluated in LPS world coordinates on
   each sequence's own grid: AxT2 on the requested grid, HighB and ADC on a coarser grid covering the same field
   of view (as real DWI), so preprocessing has real resampling to do.

World frame (LPS, mm): +x = patient left, +y = posterior, +z = superior. The gland axes are aligned with the world;
institution 2 tilts its acquisition grid by a few degrees (an oblique axial), so geometry handling is exercised.

Appearance follows prostate-mri-facts.md: AxT2 PZ bright, TZ intermediate/heterogeneous, lesions dark; HighB
suppresses normal tissue and shows lesions bright; ADC in 10^-6 mm^2/s (PZ ~1600, TZ ~1200, lesions 600-950, lower
for higher PI-RADS/ISUP, bladder ~2900, 0 in air). Intensity gains per institution reproduce the paper's Table 2
statistics (means over the whole volume, air included).

Every case draws from its own generator ``default_rng([seed, institution, index, stream])``, so a case does not
depend on which other cases are generated: same seed, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .study import Exam, LabelSource, derive_label
from .volume import NIFTI_DESCRIP_KEY, Volume, make_grid

__all__ = [
    "InstitutionProfile",
    "INSTITUTIONS",
    "get_institution",
    "LesionTruth",
    "ConfounderTruth",
    "CaseTruth",
    "PhantomCase",
    "phantom_ids",
    "sample_truth",
    "render_case",
    "generate_phantom",
    "phantom_report",
    "CSPCA_PROBABILITY",
]

#: P(csPCa | case PI-RADS), from the literature quoted in prostate-mri-facts.md.
CSPCA_PROBABILITY: dict[int, float] = {1: 0.03, 2: 0.05, 3: 0.15, 4: 0.5, 5: 0.8}
#: P(case PI-RADS); with CSPCA_PROBABILITY and ~75% histopathology, ~33% of cases are labelled positive.
_PIRADS_PRIOR = {1: 0.12, 2: 0.25, 3: 0.20, 4: 0.25, 5: 0.18}
#: P(histopathology known | case PI-RADS): biopsies follow suspicious MRI more often.
_HISTOPATHOLOGY_PROBABILITY = {1: 0.55, 2: 0.55, 3: 0.8, 4: 0.9, 5: 0.9}
_LEVELS = ("base", "mid", "apex")


@dataclass(frozen=True)
class InstitutionProfile:
    """Scanner, protocol and intensity calibration of one institution.

    Args:
        institution: 1 or 2 (the paper's Institute 1 / Institute 2).
        size, spacing: default AxT2 grid (voxels, mm); HighB/ADC use ``size // dwi_inplane_factor`` in-plane.
        oblique_deg: range of the acquisition tilt about the left-right axis (0 = true axial).
        field_strength_t: field strength recorded in reports (T).
        b_values: high b-value(s) of the HighB image (one is drawn per case).
        t2_gain, highb_gain: scale from the phantom's raw units to the institution's arbitrary units (calibrated to
            Table 2 means: AxT2 ~281 / ~224, HighB ~16.9 / ~15.2).
        adc_tissue_scale: ADC scale of soft tissue (scanner/protocol bias).
        adc_fat: ADC of fat-suppressed fat (the bulk of the field of view; drives the ADC volume mean).
        t2_noise, highb_noise: Rician noise sigma in raw units; adc_noise: relative ADC noise.
        bias_strength: amplitude of the smooth receive-coil bias field (fraction).
        t2_fluid_scale: AxT2 brightness of fluid (bladder, seminal vesicles, cysts) relative to institution 1.
    """

    institution: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    dwi_inplane_factor: int
    oblique_deg: tuple[float, float]
    field_strength_t: float
    b_values: tuple[int, ...]
    t2_gain: float
    highb_gain: float
    adc_tissue_scale: float
    adc_fat: float
    t2_noise: float
    highb_noise: float
    adc_noise: float
    bias_strength: float
    t2_fluid_scale: float = 1.0
    #: Table 2 figures the gains were calibrated to: (mean, 99.5th percentile) per sequence.
    targets: dict[str, tuple[float, float]] = field(default_factory=dict)


INSTITUTIONS: dict[int, InstitutionProfile] = {
    1: InstitutionProfile(
        institution=1,
        size=(64, 64, 32),
        spacing=(2.0, 2.0, 2.0),
        dwi_inplane_factor=2,
        oblique_deg=(0.0, 0.0),
        field_strength_t=3.0,
        b_values=(1600,),
        t2_gain=0.52,
        highb_gain=2.95,
        adc_tissue_scale=1.0,
        adc_fat=10.0,
        t2_noise=12.0,
        highb_noise=2.0,
        adc_noise=0.05,
        bias_strength=0.15,
        targets={"AxT2": (281.0, 853.0), "HighB": (16.9, 52.0), "ADC": (542.0, 2837.0)},
    ),
    2: InstitutionProfile(
        institution=2,
        size=(60, 60, 30),
        spacing=(2.15, 2.15, 2.2),
        dwi_inplane_factor=2,
        oblique_deg=(2.0, 6.0),
        field_strength_t=1.5,
        b_values=(1400, 1500),
        t2_gain=0.435,
        highb_gain=2.4,
        adc_tissue_scale=1.06,
        adc_fat=380.0,
        t2_noise=20.0,
        highb_noise=2.2,
        adc_noise=0.08,
        bias_strength=0.22,
        t2_fluid_scale=0.8,
        targets={"AxT2": (224.0, 594.0), "HighB": (15.2, 47.0), "ADC": (766.0, 3105.0)},
    ),
}


def get_institution(institution: int | str) -> InstitutionProfile:
    """The profile of institution ``1`` or ``2`` (int or string); ValueError names the allowed values."""
    try:
        key = int(str(institution).strip())
    except ValueError:
        key = -1
    if key not in INSTITUTIONS:
        raise ValueError(f"institution must be one of {sorted(INSTITUTIONS)}, got {institution!r}")
    return INSTITUTIONS[key]


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


@dataclass
class PhantomCase:
    """A generated case: the exam (AxT2 grid + coarser HighB/ADC grid, masks on the AxT2 grid), truth and report.

    ``exam.volumes``: AxT2 (X, Y, Z) float32, HighB and ADC (X/2, Y/2, Z) float32 (ADC in 10^-6 mm^2/s).
    ``exam.masks``: gland (0 bg, 1 TZ, 2 PZ) and lesion (0 bg, n = lesion n) uint8 on the AxT2 grid.
    """

    exam: Exam
    truth: CaseTruth
    report: str

    @property
    def case_id(self) -> str:
        return self.truth.case_id


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


def _cylinder_sdf(u, v, w, center_uv, semi_uv, w_range):
    """Elliptic cylinder along z between ``w_range``."""
    du, dv = u - center_uv[0], v - center_uv[1]
    a, b = semi_uv
    k0 = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
    k1 = np.sqrt((du / a**2) ** 2 + (dv / b**2) ** 2)
    radial = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
    axial = np.maximum(w_range[0] - w, w - w_range[1])
    return np.maximum(radial, axial)


def _alpha(sdf, edge_mm: float):
    """Partial-volume coverage in [0, 1] of a voxel whose centre is ``sdf`` mm from a boundary."""
    t = np.clip(0.5 - sdf / edge_mm, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


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


# ----------------------------------------------------------------------------------------------------------------
# Step 2: images
# ----------------------------------------------------------------------------------------------------------------
#: Raw tissue values (institution 1 physics): AxT2 (raw units), HighB (raw units), ADC (10^-6 mm^2/s).
#: Fluids whose AxT2 brightness depends on the protocol (TR/TE): scaled by ``InstitutionProfile.t2_fluid_scale``.
_FLUIDS = ("urine", "mucus", "sv", "cyst")
_TISSUE = {
    "fat": (640.0, 3.0, None),  # ADC of fat = profile.adc_fat (fat suppression makes it low and noisy)
    "muscle": (170.0, 9.0, 1400.0),
    "cortex": (60.0, 1.5, 350.0),
    "marrow": (520.0, 2.0, 420.0),
    "bladder_wall": (220.0, 10.0, 1400.0),
    "urine": (1650.0, 4.0, 2750.0),
    "rectal_wall": (240.0, 14.0, 1350.0),
    "gas": (15.0, 0.3, 0.0),
    "mucus": (900.0, 8.0, 2200.0),
    "sv": (1300.0, 7.0, 2150.0),
    "capsule": (260.0, 10.0, 1500.0),
    "pz": (700.0, 14.0, 1650.0),
    "tz": (400.0, 19.0, 1200.0),
    "afs": (210.0, 8.0, 1100.0),
    "urethra": (560.0, 12.0, 1900.0),
    "nodule_glandular": (600.0, 15.0, 1400.0),
    "nodule_stromal": (270.0, 20.0, 1050.0),
    "prostatitis": (400.0, 16.0, 1250.0),
    "haemorrhage": (300.0, 9.0, 1350.0),
    "cyst": (1700.0, 8.0, 2600.0),
}


def _grid_points(grid: Volume, truth: CaseTruth):
    """Local gland coordinates (u, v, w), each (X, Y, Z), of every voxel centre of ``grid``."""
    idx = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    world = (grid.direction @ (np.asarray(grid.spacing)[:, None] * idx)) + np.asarray(grid.origin)[:, None]
    local = world - np.asarray(truth.gland_center_lps)[:, None]
    return [local[n].reshape(grid.shape).astype(np.float32) for n in range(3)]


def _smooth_noise(rng: np.random.Generator, grid: Volume, sigma_mm: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field_ = gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), [sigma_mm / s for s in grid.spacing], mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def _anatomy_rng(truth: CaseTruth, seed: int) -> np.random.Generator:
    # Structures outside the gland belong to the patient (same in both studies of a patient).
    return _stream(seed, truth.institution, int(truth.patient_id[1:]), 2)


def _layers(truth: CaseTruth, seed: int) -> list[tuple[str, Any, float, float]]:
    """Structures in painting order: (tissue, signed-distance function of (u, v, w), texture amplitude, edge factor)."""
    rng = _anatomy_rng(truth, seed)
    (a, b, c), tz_center, tz_semi = _gland_frame(truth)
    L: list[tuple[str, Any, float, float]] = []
    body = (rng.uniform(150, 180), rng.uniform(105, 125))
    body_c = (rng.uniform(-4, 4), rng.uniform(0, 15))
    L.append(("fat", lambda u, v, w: _cylinder_sdf(u, v, w, body_c, body, (-500, 500)), 0.08, 1.0))
    # Muscles: gluteal (posterolateral), obturator internus (lateral), levator ani sling around the rectum.
    for s in (-1, 1):
        gl = (s * rng.uniform(60, 75), rng.uniform(55, 70))
        L.append(("muscle", lambda u, v, w, gl=gl, s=s: _ellipsoid_sdf(u, v, w, (gl[0], gl[1], 20), (45, 32, 90), 15 * s), 0.1, 1.0))
        ob = s * rng.uniform(46, 54)
        L.append(("muscle", lambda u, v, w, ob=ob: _ellipsoid_sdf(u, v, w, (ob, 0, 10), (9, 35, 60)), 0.1, 1.0))
    rect_r = rng.uniform(12.0, 16.0)
    rect_c = (rng.uniform(-3, 3), b + rect_r + rng.uniform(3, 7))
    lev = (rect_r + 7, rect_r + 7)
    L.append(("muscle", lambda u, v, w: np.abs(_cylinder_sdf(u, v, w, rect_c, lev, (-60, 0.2 * c))) - 2.5, 0.1, 1.0))
    # Bones: pubic rami (anterior), ischial tuberosities (posterolateral, caudal), femoral heads (lateral, cranial).
    bones = [((s * 30, -b - 28, 0.3 * c), (26, 8, 14), s * 10) for s in (-1, 1)]
    bones += [((s * 58, 35, -c - 15), (11, 16, 25), 0) for s in (-1, 1)]
    bones += [((s * 88, -8, c + 20), (24, 24, 24), 0) for s in (-1, 1)]
    for center, semi, rot in bones:
        L.append(("cortex", lambda u, v, w, ce=center, se=semi, ro=rot: _ellipsoid_sdf(u, v, w, ce, se, ro), 0.05, 1.0))
        inner = tuple(x - 2.0 for x in semi)
        L.append(("marrow", lambda u, v, w, ce=center, se=inner, ro=rot: _ellipsoid_sdf(u, v, w, ce, se, ro), 0.15, 1.0))
    # Bladder (cranial, anterior) with a wall.
    R = rng.uniform(22.0, 38.0)
    bl_c = (rng.uniform(-4, 4), -0.35 * b - 0.3 * R, c + 0.75 * R)
    bl_s = (1.25 * R, R, 0.85 * R)
    L.append(("bladder_wall", lambda u, v, w: _ellipsoid_sdf(u, v, w, bl_c, bl_s), 0.05, 1.0))
    bl_in = tuple(x - 3.0 for x in bl_s)
    L.append(("urine", lambda u, v, w: _ellipsoid_sdf(u, v, w, bl_c, bl_in), 0.02, 1.0))
    # Rectum (posterior): wall and lumen with gas or mucus.
    L.append(("rectal_wall", lambda u, v, w: _cylinder_sdf(u, v, w, rect_c, (rect_r, rect_r * 0.8), (-80, c + 25)), 0.1, 1.0))
    lumen = (rect_r - 4.5, rect_r * 0.8 - 4.5)
    L.append(("gas" if rng.random() < 0.6 else "mucus", lambda u, v, w: _cylinder_sdf(u, v, w, rect_c, lumen, (-80, c + 25)), 0.1, 1.0))
    # Seminal vesicles: above the base, posterior, lobulated (fluid-bright walls drawn as texture).
    for s in (-1, 1):
        sv_c = (s * rng.uniform(14, 20), 0.55 * b, c + rng.uniform(3, 7))
        L.append(("sv", lambda u, v, w, ce=sv_c, s=s: _ellipsoid_sdf(u, v, w, ce, (17, 5.5, 7), -s * 30), 0.35, 1.0))
    # Gland: capsule rim, PZ, TZ, anterior fibromuscular stroma, BPH nodules, urethra.
    L.append(("capsule", lambda u, v, w: _ellipsoid_sdf(u, v, w, (0, 0, 0), (a, b, c)), 0.05, 1.0))
    L.append(("pz", lambda u, v, w: _ellipsoid_sdf(u, v, w, (0, 0, 0), (a - 1.2, b - 1.2, c - 1.2)), 0.08, 1.0))
    L.append(("tz", lambda u, v, w: _ellipsoid_sdf(u, v, w, tz_center, tz_semi), 0.22, 1.6))
    L.append(("afs", lambda u, v, w: _ellipsoid_sdf(u, v, w, (0, -0.92 * b, 0.1 * c), (0.45 * a, 0.2 * b, 0.7 * c)), 0.08, 1.5))
    for _ in range(truth.bph_nodules):
        for _try in range(30):
            r = rng.uniform(3.0, 9.0)
            p = np.array(tz_center) + rng.uniform(-1, 1, 3) * np.array(tz_semi) * 0.8
            if float(_ellipsoid_sdf(*p, tz_center, tz_semi)) < -r * 0.6:
                break
        kind = "nodule_glandular" if rng.random() < 0.5 else "nodule_stromal"
        L.append((kind, lambda u, v, w, p=p, r=r: _ellipsoid_sdf(u, v, w, tuple(p), (r, r * 0.9, r)), 0.08, 0.8))
    ur_v = tz_center[1] * 0.6
    L.append(("urethra", lambda u, v, w: _cylinder_sdf(u, v, w - 0.0, (0, ur_v + 0.08 * w), (2.5, 2.5), (-c - 5, c)), 0.05, 1.0))
    return L


def _confounder_layers(truth: CaseTruth) -> list[tuple[str, Any, float, float]]:
    L = []
    for conf in truth.confounders:
        p = tuple(_to_local(truth, conf.center_lps))
        r = conf.size_mm / 2.0
        if conf.kind == "prostatitis":  # band / wedge: flattened, elongated, ill-defined
            L.append(("prostatitis", lambda u, v, w, p=p, r=r: _ellipsoid_sdf(u, v, w, p, (r * 1.3, r * 0.35, r)), 0.1, 2.5))
        else:
            L.append((conf.kind, lambda u, v, w, p=p, r=r: _ellipsoid_sdf(u, v, w, p, (r, r * 0.85, r * 0.9)), 0.08, 1.0))
    return L


def _lesion_values(truth: CaseTruth, lesion: LesionTruth) -> tuple[float, float, float]:
    """Lesion AxT2 (raw), HighB (raw) and ADC: more conspicuous for higher PI-RADS and ISUP."""
    t2 = {3: 0.6, 4: 0.48, 5: 0.4}[lesion.pirads] * (_TISSUE["pz"][0] if lesion.zone == "PZ" else _TISSUE["tz"][0] * 1.35)
    highb = {3: 34.0, 4: 46.0, 5: 58.0}[lesion.pirads] + 3.0 * max(truth.hidden_isup - 1, 0)
    return t2, highb, lesion.adc


def render_case(truth: CaseTruth, size=None, spacing=None, seed: int = 0) -> PhantomCase:
    """Paint a case's images and masks from its truth.

    Args:
        size, spacing: AxT2 grid (voxels, mm); ``None`` = the institution's default.

    Returns:
        :class:`PhantomCase` with AxT2 (X, Y, Z), HighB/ADC (ceil(X/2), ceil(Y/2), Z) on the same field of view,
        and gland/lesion masks on the AxT2 grid.
    """
    profile = get_institution(truth.institution)
    size = tuple(int(s) for s in (profile.size if size is None else size))
    spacing = tuple(float(s) for s in (profile.spacing if spacing is None else spacing))
    if len(size) != 3 or min(size) < 4 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"size must be 3 integers >= 4 and spacing 3 positive numbers, got {size}, {spacing}")
    t = math.radians(truth.oblique_deg)
    direction = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    (a, b, c), _, _ = _gland_frame(truth)
    # The field of view covers the gland and the bladder base above it.
    center = np.asarray(truth.gland_center_lps) + direction @ np.array([0.0, -4.0, 0.12 * size[2] * spacing[2]])
    t2_grid = make_grid(size, spacing, center, direction)
    f = profile.dwi_inplane_factor
    dwi_size = (math.ceil(size[0] / f), math.ceil(size[1] / f), size[2])
    dwi_spacing = (size[0] * spacing[0] / dwi_size[0], size[1] * spacing[1] / dwi_size[1], spacing[2])
    dwi_grid = make_grid(dwi_size, dwi_spacing, center, direction)

    layers = _layers(truth, seed) + _confounder_layers(truth)
    lesion_layers = []
    for lesion in truth.lesions:
        p = tuple(_to_local(truth, lesion.center_lps))
        edge = 2.2 if lesion.zone == "TZ" else 1.0  # TZ cancer: ill-defined "erased charcoal" margins
        fn = lambda u, v, w, p=p, s=lesion.semi_axes_mm, r=lesion.rotation_deg: _ellipsoid_sdf(u, v, w, p, s, r)  # noqa: E731
        lesion_layers.append((_lesion_values(truth, lesion), fn, 0.06, edge))

    rng_t2 = _stream(seed, truth.institution, int(truth.study_id[1:]), 3)
    rng_dwi = _stream(seed, truth.institution, int(truth.study_id[1:]), 4)
    descrip = {NIFTI_DESCRIP_KEY: "CCELLA phantom (procedural, not a real patient)"}
    meta = {"institution": str(truth.institution), "b_value": str(truth.b_value), **descrip}

    # AxT2 + masks.
    u, v, w = _grid_points(t2_grid, truth)
    edge = float(np.mean(spacing))
    tex_fine, tex_coarse = _smooth_noise(rng_t2, t2_grid, 1.5), _smooth_noise(rng_t2, t2_grid, 5.0)
    t2 = np.zeros(size, np.float32)
    for tissue, fn, amp, edge_factor in layers:
        alpha = _alpha(fn(u, v, w), edge * edge_factor)
        value = _TISSUE[tissue][0] * (profile.t2_fluid_scale if tissue in _FLUIDS else 1.0) * (1.0 + amp * (0.7 * tex_fine + 0.3 * tex_coarse))
        t2 += alpha * (value - t2)
    for (value, _, _), fn, amp, edge_factor in lesion_layers:
        alpha = _alpha(fn(u, v, w), edge * edge_factor)
        t2 += alpha * (value * (1.0 + amp * tex_fine) - t2)
    gland = _alpha(_ellipsoid_sdf(u, v, w, (0, 0, 0), (a, b, c)), edge) > 0.5
    _, tz_center, tz_semi = _gland_frame(truth)
    tz = _alpha(_ellipsoid_sdf(u, v, w, tz_center, tz_semi), edge) > 0.5
    gland_mask = np.where(gland, np.where(tz, 1, 2), 0).astype(np.uint8)
    lesion_mask = np.zeros(size, np.uint8)
    for lesion, (_, fn, _, _) in zip(truth.lesions, lesion_layers):
        lesion_mask[_alpha(fn(u, v, w), edge) > 0.5] = lesion.index
    t2 = _bias(rng_t2, t2_grid, profile.bias_strength) * t2
    t2 = _rician(rng_t2, t2, profile.t2_noise) * profile.t2_gain

    # HighB + ADC on the coarser DWI grid.
    u, v, w = _grid_points(dwi_grid, truth)
    edge = float(np.mean(dwi_spacing))
    tex = _smooth_noise(rng_dwi, dwi_grid, 3.0)
    highb = np.zeros(dwi_size, np.float32)
    adc = np.zeros(dwi_size, np.float32)
    body = np.zeros(dwi_size, np.float32)
    for tissue, fn, amp, edge_factor in layers:
        alpha = _alpha(fn(u, v, w), edge * edge_factor)
        _, hb, ad = _TISSUE[tissue]
        ad = profile.adc_fat if ad is None else ad * profile.adc_tissue_scale
        highb += alpha * (hb * (1.0 + amp * tex) - highb)
        adc += alpha * (ad * (1.0 + 0.5 * amp * tex) - adc)
        if tissue == "fat":
            body = alpha
    for (_, hb, ad), fn, amp, edge_factor in lesion_layers:
        alpha = _alpha(fn(u, v, w), edge * edge_factor)
        highb += alpha * (hb * (1.0 + amp * tex) - highb)
        adc += alpha * (ad * (1.0 + 0.3 * amp * tex) - adc)
    # Higher b suppresses more: b1400-1500 images keep a little more signal than b1600.
    highb *= (1600.0 / truth.b_value) ** 0.5
    highb = _rician(rng_dwi, _bias(rng_dwi, dwi_grid, profile.bias_strength) * highb, profile.highb_noise) * profile.highb_gain
    adc_noise = rng_dwi.standard_normal(dwi_size).astype(np.float32) * (30.0 + profile.adc_noise * adc)
    adc = np.clip((adc + adc_noise) * body, 0.0, 4000.0)  # 0 in air (no diffusion signal fitted)

    exam = Exam(
        volumes={
            "AxT2": t2_grid.with_array(t2.astype(np.float32), **meta),
            "HighB": dwi_grid.with_array(highb.astype(np.float32), **meta),
            "ADC": dwi_grid.with_array(adc.astype(np.float32), **meta, units="1e-6 mm2/s"),
        },
        masks={
            "gland": t2_grid.with_array(gland_mask, **descrip),
            "lesion": t2_grid.with_array(lesion_mask, **descrip),
        },
        case_id=truth.case_id,
    )
    return PhantomCase(exam=exam, truth=truth, report=phantom_report(truth, seed))


def phantom_report(truth: CaseTruth, seed: int = 0) -> str:
    """The case's report (deterministic in seed, institution and case index; ``""`` for ~10% of cases)."""
    from .phantom_reports import write_report

    return write_report(truth, _stream(seed, truth.institution, int(truth.study_id[1:]), 5))


def _bias(rng: np.random.Generator, grid: Volume, strength: float) -> np.ndarray:
    """Smooth multiplicative receive-coil bias field, exp of a random linear + quadratic ramp."""
    coords = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in grid.shape], indexing="ij")
    k = rng.normal(0.0, 1.0, 6).astype(np.float32)
    ramp = k[0] * coords[0] + k[1] * coords[1] + 0.4 * k[2] * coords[2] + 0.5 * (k[3] * coords[0] ** 2 + k[4] * coords[1] ** 2 + k[5] * coords[0] * coords[1])
    return np.exp(strength * ramp / 2.0).astype(np.float32)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (MRI magnitude images)."""
    n1 = rng.standard_normal(signal.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(signal.shape).astype(np.float32) * sigma
    return np.sqrt((signal + n1) ** 2 + n2**2).astype(np.float32)


def generate_phantom(
    case_index: int,
    institution: int | str = 1,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    seed: int = 0,
    *,
    multi_study_fraction: float = 0.1,
) -> PhantomCase:
    """Generate phantom case ``case_index`` of ``institution``: truth, images, masks and report.

    Deterministic in ``(seed, institution, case_index)`` (and the grid); independent of other cases.

    Args:
        size: AxT2 grid in voxels (X, Y, Z); default the institution's (64x64x32 for institution 1).
        spacing: AxT2 voxel size in mm; default the institution's (2.0 mm for institution 1, ~128x128x64 mm FOV).
        multi_study_fraction: fraction of patients with two studies (decides patient ids).
    """
    if case_index < 0:
        raise ValueError(f"case_index must be >= 0, got {case_index}")
    truth = sample_truth(case_index, institution, seed, multi_study_fraction=multi_study_fraction)
    return render_case(truth, size=size, spacing=spacing, seed=seed)
