"""The phantom world's institutions: scanner protocol, geometry and appearance of each (institution 1 is the
reference protocol; institution 2 differs the way a second hospital's scanner does). Used by the truth
(:mod:`~CCELLACore.data.phantom_truth`) and the renderer (:mod:`~CCELLACore.data.phantoms`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["InstitutionProfile", "INSTITUTIONS", "get_institution"]


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
