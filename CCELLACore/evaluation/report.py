"""The evaluation report: ``report.md`` (tables) and ``figures/*.png``, from the metrics dict of ``evaluate``.

Every figure and table that shows a FID or KID names its backbone and the SHA-256 of its weights; a stand-in
backbone is marked as such in its title. Figures: ``montage.png`` (axial slices of real and synthetic exams),
``histograms.png`` (intensity histograms per sequence), ``fid_<backbone>.png`` (FID per key with intervals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.study import SEQUENCES
from ..fileio import atomic_path, atomic_write_text

__all__ = ["write_report", "report_markdown"]

_SYNTHETIC_NOTE = "synthetic exams are SYNTHETIC (generated), not patient data"


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def _montage(passes: dict[str, dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from ..visualize import exam_montage

    panels = [(f"{name} {k + 1}", exam_montage(exam, 4)) for name in ("real", "synthetic")
              for k, exam in enumerate(passes[name]["exams"])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"Rows: AxT2, HighB, ADC; columns: axial slices. {_SYNTHETIC_NOTE}", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return path


def _histograms(passes: dict[str, dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SEQUENCES), figsize=(5 * len(SEQUENCES), 3.4))
    for ax, name in zip(axes, SEQUENCES):
        values = {k: np.concatenate([v.ravel() for v in p["volumes"][name]]) for k, p in passes.items()
                  if p["volumes"][name]}
        if not values:
            ax.set_title(f"{name}: no volumes")
            continue
        low, high = np.percentile(np.concatenate(list(values.values())), [0.5, 99.5])
        for label, v in values.items():
            ax.hist(v, bins=80, range=(low, high), density=True, histtype="step", label=label)
        ax.set_title(f"{name} intensities" + (" (10^-6 mm^2/s)" if name == "ADC" else " (arbitrary units)"))
        ax.legend()
    fig.suptitle(f"Voxel intensity histograms of the sampled exams; {_SYNTHETIC_NOTE}", fontsize=9, y=1.03)
    _save(fig, path)
    plt.close(fig)
    return path


def _fid_figure(result: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    keys = [k for k, v in result["per_key"].items() if "fid" in v]
    if not keys:
        return None
    values = np.array([result["per_key"][k]["fid"]["value"] for k in keys])
    low = values - np.array([result["per_key"][k]["fid"]["ci_low"] for k in keys])
    high = np.array([result["per_key"][k]["fid"]["ci_high"] for k in keys]) - values
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(keys) + 2), 3.6))
    ax.bar(keys, values, yerr=np.nan_to_num(np.stack([low, high])), capsize=4)
    ax.set_ylabel("FID (95% bootstrap interval)")
    ax.set_title(f"FID, backbone: {result['label']}", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    _save(fig, path)
    plt.close(fig)
    return path


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _interval(m: dict[str, Any]) -> str:
    return f"{_num(m['value'])} [{_num(m['ci_low'])}, {_num(m['ci_high'])}]"


def report_markdown(metrics: dict[str, Any], figures: list[str]) -> str:
    lines = ["# Evaluation report", "",
             f"Real: `{metrics['real_manifest']}` ({metrics['n_real']} exams compared, splits: "
             f"{metrics['real_splits']}); synthetic: `{metrics['synthetic_manifest']}` ({metrics['n_synthetic']} "
             f"exams). {_SYNTHETIC_NOTE.capitalize()}. Device: {metrics['device']}; {metrics['seconds']} s.", "",
             "## Fidelity: FID and KID", "",
             "Value [95% bootstrap interval over exams]. Lower is closer to the real exams. Each table names its "
             "backbone and the SHA-256 of its weights; numbers of different backbones are not comparable.", ""]
    for key, result in metrics["fidelity"].items():
        if not result.get("available"):
            lines += [f"- **{key}**: unavailable: {result['reason']}.", ""]
            continue
        b = result["backbone"]
        lines += [f"### {result['label']}", "",
                  f"Weights `{b['weights_file']}`, sha256 `{b['weights_sha256']}`."
                  + (" **Stand-in** feature extractor, trained by this project: its numbers are not comparable "
                     "with published FIDs." if b["standin"] else ""), "",
                  "| features | FID | KID | exams real / synthetic | feature rows real / synthetic |",
                  "|---|---|---|---|---|"]
        for k, v in result["per_key"].items():
            if "fid" not in v:
                lines.append(f"| {k} | {v['error']} | | | |")
                continue
            f = v["fid"]
            lines.append(f"| {k} | {_interval(f)} | {_interval(v['kid'])} | {f['n_real']} / {f['n_synthetic']} | "
                         f"{f['rows_real']} / {f['rows_synthetic']} |")
        if result["overall"].get("fid") is not None:
            lines.append(f"| overall (mean) | {_num(result['overall']['fid'])} | {_num(result['overall']['kid'])} "
                         "| | |")
        lines.append("")
    lines += ["## Diversity: MS-SSIM between exams of one set", "",
              "Mean MS-SSIM over random pairs (lower = more varied). The real exams' figure is the yardstick.", "",
              "| sequence | synthetic | real | pairs synthetic / real |", "|---|---|---|---|"]
    for name, d in metrics["diversity"].items():
        lines.append(f"| {name} | {_num(d['synthetic']['mean'])} | {_num(d['real']['mean'])} | "
                     f"{d['synthetic']['n_pairs']} / {d['real']['n_pairs']} |")
    lines += ["", "## Intensities (Table 2)", "",
              "Mean over volumes of each volume's 0.5th percentile, mean and 99.5th percentile.", "",
              "| set | sequence | institution | split | exams | 0.5% | mean | 99.5% |",
              "|---|---|---|---|---|---|---|---|"]
    for r in metrics["intensity"]:
        lines.append(f"| {r['set']} | {r['sequence']} | {r['institution']} | {r['split']} | {r['n']} | "
                     f"{r['p0_5']:.4g} | {r['mean']:.4g} | {r['p99_5']:.4g} |")
    lines += ["", "## Faithfulness", ""]
    c = metrics["faithfulness"]["classifier"]
    if c.get("available", True):
        lines.append(f"- Classifier `{c['classifier']['name']}` (hash `{c['classifier']['hash'][:12]}`) on the "
                     f"synthetic exams against their reports' classes: AUC {_num(c['auc'], 3)}, accuracy at 0.5 "
                     f"{c['accuracy']['count']} ({c['n_positive']} of {c['n']} reports positive).")
    else:
        lines.append(f"- Classifier agreement: unavailable: {c['reason']}.")
    p = metrics["faithfulness"]["phantom_lesions"]
    if p.get("available", True):
        lines += ["", f"Phantom lesion check ({p['detector']}), {p['n']} exams:", "",
                  "| report group | lesion found | side of the report's index lesion |", "|---|---|---|"]
        for group, g in p["groups"].items():
            lines.append(f"| {group} | {g['lesion_found']['count']} | {g['side_correct']['count']} |")
    else:
        lines.append(f"- Phantom lesion check: unavailable: {p['reason']}.")
    m = metrics["memorisation"]
    y = m["yardstick"]
    lines += ["", "## Memorisation audit", "",
              f"Space: {m['space']}. Yardstick ({y['kind']}, n = {y['n']}): min {_num(y['min'])}, 1st percentile "
              f"{_num(y['p1'])}, median {_num(y['median'])}. Possible copy: nearest distance < {m['ratio']} x the "
              f"1st percentile = {_num(m['threshold'])}.", "",
              f"**{len(m['possible_copies'])} possible copies** among {len(m['synthetic'])} synthetic exams"
              + (":" if m["possible_copies"] else "."), ""]
    for r in m["possible_copies"]:
        lines.append(f"- `{r['case_id']}` ~ training exam `{r['nearest_train_case']}` (distance "
                     f"{_num(r['distance'])})")
    nearest = sorted(r["distance"] for r in m["synthetic"])
    if nearest:
        lines += ["", f"Nearest distances of the synthetic exams: min {_num(nearest[0])}, median "
                  f"{_num(float(np.median(nearest)))}."]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{Path(f).name})" for f in figures] + [""]
    return "\n".join(lines)


def write_report(metrics: dict[str, Any], out: Path, passes: dict[str, dict]) -> Path:
    """Write the figures and ``report.md``; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    figures_dir = out / "figures"
    figures = [_montage(passes, figures_dir / "montage.png"), _histograms(passes, figures_dir / "histograms.png")]
    for key, result in metrics["fidelity"].items():
        if result.get("available"):
            figures.append(_fid_figure(result, figures_dir / f"fid_{key}.png"))
    names = [str(f) for f in figures if f is not None]
    metrics["figures"] = [f"figures/{Path(f).name}" for f in names]
    return atomic_write_text(out / "report.md", report_markdown(metrics, names))
