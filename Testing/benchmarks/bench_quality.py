"""Quality of each sampler setting on the phantom world, with the embedded demo model, so that speed is never bought
with quality silently.

The demo model is velocity-trained (rectified flow, default 30 steps), so its samplers are rectified flow at fewer
or more steps; DDPM / DDIM / DPM-Solver++ need a noise-trained model, and no trained one exists at demo scale. Every
setting generates the SAME reports with the SAME seeds (paired), and each exam is judged with the honour metric's
fixed parts (CCELLACore/metrics/honour.py): the anatomy check against real phantom exams, and the lesion detector
with the gland atlas (a lesion for PI-RADS >= 4 reports, none for PI-RADS 1-2). Also: the correlation of each exam
with the default setting's exam of the same seed (1.0 = the same volume), and the time per exam.

Hook for the image-quality metrics (FID / KID, being built in CCELLACore/evaluation/): when that package provides
``image_quality(generated: list[Exam], real: list[Exam]) -> dict[str, float]``, its figures join the table
(:func:`evaluation_hook`); until then the column says "not available".

Usage (about 5 minutes idle, 15+ loaded)::

    PYTHONPATH=. python Testing/benchmarks/bench_quality.py --threads 2 --n 16 --steps 30 15 10 5
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from _common import describe_machine, machine_lines, machine_load, set_threads, table, write_section


def evaluation_hook(generated: list, real: list) -> dict[str, float] | None:
    """FID/KID etc. of ``generated`` against ``real`` exams where CCELLACore.evaluation offers them, else None."""
    try:
        from CCELLACore import evaluation  # noqa: F401  (built by the evaluation work; absent until then)
    except ImportError:
        return None
    image_quality = getattr(evaluation, "image_quality", None)
    return dict(image_quality(generated, real)) if callable(image_quality) else None


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=16, help="reports per setting")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 15, 10, 5], help="rflow steps; first = reference")
    parser.add_argument("--decoder", choices=("full", "light"), default="full")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    machine = describe_machine(args.threads)

    from CCELLACore.metrics.honour import (HonourSettings, _case_base, _detect, anatomy, evaluation_cases,
                                           grid_reference, model_settings, real_exam_on_grid)
    from CCELLACore.metrics.lesion_detector import DetectorThresholds
    from CCELLACore.pipelines.generate_cli import DEMO_MODEL_DIR
    from CCELLACore.pipelines.generation import CCELLAPipeline

    pipe = CCELLAPipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu", decoder=args.decoder)
    settings = model_settings(pipe, HonourSettings(n=args.n))
    config = pipe.config.preprocess.ldm
    atlas, references = grid_reference(config, settings)
    cases = evaluation_cases(args.n, settings.seed, settings.institution)
    real = [real_exam_on_grid(c.index, settings.seed, config, settings) for c in cases] \
        if evaluation_hook([], []) is not None else []
    results: dict[int, dict[str, Any]] = {}
    reference_volumes: list[dict[str, np.ndarray]] = []
    for steps in args.steps:
        print(f"rflow {steps} steps x {args.n} exams ...", flush=True)
        records, exams, seconds = [], [], 0.0
        for k, case in enumerate(cases):
            started = time.perf_counter()
            out = pipe(case.report, seed=k, steps=steps, sampler="rflow")
            seconds += time.perf_counter() - started
            base = _case_base(case)
            record = {"group": base["group"], **_detect(out.exam, atlas, base["truth_side"], DetectorThresholds()),
                      **anatomy(out.exam, references)}
            volumes = {n: np.asarray(v.array, np.float64) for n, v in out.exam.volumes.items()}
            if steps == args.steps[0]:
                reference_volumes.append(volumes)
            record["r_to_reference"] = min(_corr(volumes[n], reference_volumes[k][n]) for n in volumes)
            records.append(record)
            exams.append(out.exam)
        results[steps] = {"records": records, "seconds": seconds / args.n,
                          "image_quality": evaluation_hook(exams, real) if real else None}
    end_load = machine_load()

    def rate(records, group, key="detected"):
        chosen = [r for r in records if r["group"] == group]
        return f"{sum(bool(r[key]) for r in chosen)}/{len(chosen)}" if chosen else "-"

    rows = []
    for steps, res in results.items():
        recs = res["records"]
        quality = res["image_quality"]
        rows.append([f"rflow {steps}", f"{res['seconds']:.2f} s", f"{sum(r['anatomy'] for r in recs)}/{len(recs)}",
                     rate(recs, "pirads_4_5"), rate(recs, "pirads_1_2"),
                     f"{np.median([r['r_to_reference'] for r in recs]):.3f}",
                     ", ".join(f"{k} {v:.3g}" for k, v in quality.items()) if quality else "not available"])
    lines = machine_lines(machine, end_load) + [
        f"- Demo model (velocity-trained, default rflow {pipe.config.sampling.steps} steps), {args.decoder} decoder, "
        f"{args.n} phantom reports of seed {settings.seed} (never trained on), generation seeds 0..{args.n - 1}, "
        "the same for every row. Lesion found = the honour metric's fixed detector with the gland atlas.", "",
        *table(["sampler", "time per exam", "anatomy", "lesion found, PI-RADS >= 4", "lesion found, PI-RADS 1-2",
                f"median r to rflow {args.steps[0]} (same seed)", "FID / KID (CCELLACore.evaluation)"], rows), "",
        "DDPM 1000 / DDIM 50 / DPM-Solver++ need a noise-trained model; no trained one exists at demo scale, so their "
        "quality is not measured here (their cost is in the paper-exam table).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        print(f"wrote {write_section('quality', 'Sampler quality on the phantom world (demo model)', lines)}")


if __name__ == "__main__":
    main()
