"""Quality of each sampler setting on the phantom world, with the embedded demo model, measured by the evaluation's own
metrics (``ccella evaluate``), so that speed is never bought with quality silently.

One run makes a real set (phantom exams of a seed the model never saw, in physical units), then for
every setting ``ccella synthesize`` makes one synthetic exam per real exam from its report (the same reports and
generation seeds for every setting: paired) and ``ccella evaluate`` scores it: FID / KID on the stand-in backbone
(the demo classifier's features) with bootstrap intervals, the classifier's AUC on the synthetic exams against their
reports' labels, the phantom detector's lesion presence and side against the reports, and MS-SSIM diversity.

The demo model is velocity-trained, so its sampler is rectified flow at more or fewer steps; DDPM / DDIM /
DPM-Solver++ need a noise-trained model, and no trained one exists at demo scale (their cost is in the paper-exam
table). The many-step row is the reference the faster ones are compared with.

Usage (about 20 minutes on 2 idle cores for 40 exams and steps 100 30 10)::

    PYTHONPATH=. python Testing/benchmarks/bench_quality.py --threads 2 --n 40 --steps 100 30 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import describe_machine, machine_lines, machine_load, set_threads, table, write_section

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "CCELLACore" / "demo_model"
DEMO_CLASSIFIER = REPO / "CCELLACore" / "demo_classifier"


def real_set(work: Path, n: int, seed: int, name: str = "real") -> Path:
    """n phantom exams of ``seed`` as the demo's phantom world renders them (physical units, own masks; their truth
    beside the manifest for the detector), the real data a user would give ``ccella evaluate``."""
    from CCELLACore.cli import main

    phantoms = work / f"phantoms_{name}"
    assert main(["phantoms", "--config", "demo", "--institution", "1", "--n", str(n), "--seed", str(seed),
                 "--out", str(phantoms), "--layouts", "none", "--no-progress"]) == 0
    return phantoms / "manifest.csv"


def _interval(entry: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    value = f"{entry['value'] * scale:.{digits}g}"
    if entry.get("ci_low") is None:
        return value
    return f"{value} [{entry['ci_low'] * scale:.{digits}g}, {entry['ci_high'] * scale:.{digits}g}]"


def summarise(metrics: dict[str, Any]) -> dict[str, str]:
    """The figures of one ``metrics.json`` that the table shows."""
    standin = metrics["fidelity"].get("standin", {})
    per = standin.get("per_key", {}) if standin.get("available") else {}
    faith = metrics.get("faithfulness", {})
    auc = faith.get("classifier", {}).get("auc")
    groups = faith.get("phantom_lesions", {}).get("groups", {})
    return {
        "fid": "; ".join(f"{_interval(v.get('fid'))}" for v in per.values()) or "-",
        "kid": "; ".join(f"{_interval(v.get('kid'), 1e3)}" for v in per.values()) or "-",
        "auc": f"{auc:.3f}" if isinstance(auc, float) else "-",
        "lesion_45": groups.get("pirads_4_5", {}).get("lesion_found", {}).get("count", "-"),
        "lesion_12": groups.get("pirads_1_2", {}).get("lesion_found", {}).get("count", "-"),
        "side": groups.get("pirads_4_5", {}).get("side_correct", {}).get("count", "-"),
        "diversity": "; ".join(f"{name} {v['synthetic'].get('mean', float('nan')):.3f}"
                               for name, v in metrics.get("diversity", {}).items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=40, help="real exams = synthetic exams per setting")
    parser.add_argument("--seed", type=int, default=1000, help="phantom seed of the real set (never trained on)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 30, 10], help="rflow steps; first = reference")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--work", type=Path, default=None, help="keep the exams here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    machine = describe_machine(args.threads)

    from CCELLACore.cli import main as ccella
    from CCELLACore.models.serialization import model_hash
    from CCELLACore.settings import load_config

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    real = real_set(work, args.n, args.seed)
    sampling = load_config(DEMO_MODEL / "config.yaml").sampling
    weights = model_hash(DEMO_MODEL)  # the figures belong to these weights: a retrained demo model needs a re-run
    rows, raw = [], {}

    def score(label: str, name: str, manifest: Path, seconds: str) -> None:
        print(f"{name}: evaluate ...", flush=True)
        assert ccella(["evaluate", "--real", str(real), "--synthetic", str(manifest),
                       "--out", str(work / f"eval_{name}"), "--standin", str(DEMO_CLASSIFIER),
                       "--classifier", str(DEMO_CLASSIFIER), "--bootstrap", str(args.bootstrap),
                       "--cache", str(work / "cache"), "--no-progress"]) == 0
        metrics = json.loads((work / f"eval_{name}" / "metrics.json").read_text())
        raw[name] = metrics
        s = summarise(metrics)
        rows.append([label, seconds, s["fid"], s["kid"], s["auc"], s["lesion_45"], s["lesion_12"], s["side"],
                     s["diversity"]])

    # the floor: other real exams of the same world, scored as if synthetic
    score(f"real exams of seed {args.seed + 1} (floor)", "floor", real_set(work, args.n, args.seed + 1, "floor"), "-")
    for steps in args.steps:
        name = f"rflow_{steps}"
        print(f"{name}: synthesize {args.n} exams ...", flush=True)
        started = time.perf_counter()
        assert ccella(["synthesize", "--manifest", str(real), "--model", str(DEMO_MODEL), "--out",
                       str(work / name), "--sampler", "rflow", "--steps", str(steps), "--no-progress"]) == 0
        seconds = (time.perf_counter() - started) / args.n
        score(f"rflow {steps}", name, work / name / "manifest.csv", f"{seconds:.2f} s")
    end_load = machine_load()
    (work / "bench_quality.json").write_text(json.dumps(raw, indent=1, default=str))
    lines = machine_lines(machine, end_load) + [
        f"- Demo model, weights `{weights[:12]}` (velocity-trained; its sampling defaults: guidance {sampling.guidance:g}, side contrast "
        f"{sampling.side_contrast}, side scale {sampling.side_scale:g}), "
        f"full decoder; real set: {args.n} phantom exams of seed {args.seed} (never trained on); each setting "
        f"synthesizes one exam per real exam from its report, generation seeds 0..{args.n - 1} for every row "
        "(paired). Figures from `ccella evaluate` with the demo classifier as the "
        f"stand-in backbone and as the faithfulness classifier, {args.bootstrap} bootstrap resamples (95% "
        "intervals in brackets). KID x 1000. Lesion / side: the phantom detector against the reports. Time per "
        "exam includes writing it.", "",
        *table(["sampler", "time per exam", "FID (stand-in)", "KID x 1e3 (stand-in)", "classifier AUC",
                "lesion, PI-RADS >= 4", "lesion, PI-RADS 1-2", "side right", "MS-SSIM (synthetic)"], rows), "",
        "A faster setting keeps the quality bar when its FID and KID intervals overlap the reference row's and its "
        "lesion counts are within one or two exams of it. The floor row scores other real exams as if they were "
        "generated: every generated row lies far above it (and the classifier's AUC falls on generated exams), so "
        "the stand-in features tell generated from real exams; the rows compare the settings with each other.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        print(f"wrote {write_section('quality', 'Sampler quality on the phantom world (demo model)', lines)}")


if __name__ == "__main__":
    main()
