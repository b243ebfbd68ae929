"""The phantom world: procedural biparametric prostate MRI exams with known truth.

No public prostate MRI can be downloaded here, so tests, the demo model and a miniature of the paper's
domain-adaptation study use these phantoms. Each case is drawn in two steps:

1. :func:`sample_truth` (in :mod:`~CCELLACore.data.phantom_truth`) draws what a radiologist and a pathologist
   would know (cheap, no images): gland size, 0-3 lesions in named sectors (side, level, zone) with PI-RADS 3-5,
   confounders (BPH, prostatitis, haemorrhage, cysts), PSA, case PI-RADS, ISUP when histopathology exists, and the
   csPCa label via :func:`~CCELLACore.data.study.derive_label`.
2. :func:`render_case` paints the anatomy (body, fat, muscles, bones, bladder, rectum, seminal vesicles, PZ/TZ,
   BPH nodules, urethra, confounders, lesions) as smooth analytic shapes evaluated in LPS world coordinates on
   each sequence's own grid: AxT2 on the requested grid, HighB and ADC on a coarser grid covering the same field
   of view (as real DWI), so preprocessing has real resampling to do.

World frame (LPS, mm): +x = patient left, +y = posterior, +z = superior. The gland axes are aligned with the world;
institution 2 tilts its acquisition grid by a few degrees (an oblique axial), so geometry handling is exercised.

Appearance follows the usual bpMRI description: AxT2 PZ bright, TZ intermediate/heterogeneous, lesions dark; HighB
suppresses normal tissue and shows lesions bright; ADC in 10^-6 mm^2/s (PZ ~1600, TZ ~1200, lesions 600-950, lower
for higher PI-RADS/ISUP, bladder ~2900, 0 in air). Intensity gains per institution reproduce the paper's Table 2
statistics (means over the whole volume, air included).

Modules, and why the imports go one way:

- :mod:`~CCELLACore.data.phantom_institutions`: the institutions' scanner and appearance profiles (imports nothing).
- :mod:`~CCELLACore.data.phantom_truth`: truth dataclasses, ids, random streams, :func:`sample_truth` and the
  gland-frame geometry it needs. Imports neither of the two below.
- :mod:`~CCELLACore.data.phantom_reports`: the report text, written from a truth alone (imports phantom_truth).
- this module: the images and masks (:func:`render_case`), :class:`PhantomCase`, :func:`generate_phantom` and
  :func:`phantom_report` (imports both). Images and reports are both written from the truth, so
  ``phantom_truth <- phantom_reports <- phantoms`` has no cycle. The truth names are re-exported here, so
  ``from CCELLACore.data.phantoms import CaseTruth, sample_truth`` keeps working.

Every case draws from its own generator ``default_rng([seed, institution, index, stream])``, so a case does not
depend on which other cases are generated: same seed, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .phantom_institutions import INSTITUTIONS, InstitutionProfile, get_institution
from .phantom_reports import write_report
from .phantom_truth import (
    CSPCA_PROBABILITY,
    CaseTruth,
    ConfounderTruth,
    LesionTruth,
    _ellipsoid_sdf,
    _gland_frame,
    _stream,
    _to_local,
    phantom_ids,
    sample_truth,
)
from .study import Exam
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
# Rendering geometry (local gland frame; the truth's helpers are in phantom_truth)
# ----------------------------------------------------------------------------------------------------------------
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
