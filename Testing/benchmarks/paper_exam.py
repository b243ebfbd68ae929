"""Time one paper-size bpMRI exam (256 x 256 x 128, AxT2 + HighB + ADC) with the fastest default settings and, in
the same run, with the paper's settings (DDPM 1000 steps + the full MAISI decoder), projected from measured parts.

Random weights (timing does not depend on them). What is measured here, in this run, on this machine:

- the adapter + U-Net step at the paper's latent (12 x 64 x 64 x 32, 512 tokens x 4096), best of ``--steps``
  timed steps after one warm-up, at the precision generation chooses (bf16 only where native);
- one sampler update of each sampler on that latent (the arithmetic between U-Net calls);
- the light decoder on one whole 256 x 256 x 128 volume;
- the full decoder on one 128 x 128 x 64 volume (a 256 x 256 x 128 decode takes ~6 minutes on 2 cores; the
  projection is x8: its convolutions are linear in voxels, checked by bench_autoencoder.py's growth rows).

An exam = steps x (U-Net step + sampler update) + 3 decodes. Not included: encoding the report (Flan-T5-XXL, whose
weights are not bundled; once per exam, independent of the sampler and decoder) and writing files.
The last line printed is one JSON object: ``{"fast_s", "paper_s", "cpu", "precision", ...}``.

Usage (about 3 minutes on 2 idle cores, 10+ when loaded)::

    PYTHONPATH=. python Testing/benchmarks/paper_exam.py --threads 2 [--write]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import PAPER_LATENT, describe_machine, fmt_s, machine_lines, machine_load, set_threads, write_section

#: The fastest default: DPM-Solver++(2M) at 20 steps (its authors' setting for guided sampling; a noise-trained
#: model's default sampler) with the light decoder. Velocity models: rectified flow at 30 steps (same cost model).
FAST = {"sampler": "dpm-solver++", "steps": 20, "decoder": "light"}
PAPER = {"sampler": "ddpm", "steps": 1000, "decoder": "full"}
ALSO = [{"sampler": "ddim", "steps": 50, "decoder": "full"}, {"sampler": "ddim", "steps": 50, "decoder": "light"},
        {"sampler": "dpm-solver++", "steps": 20, "decoder": "full"}, {"sampler": "dpm-solver++", "steps": 10,
                                                                      "decoder": "light"}]


def sampler_update_s(name: str, steps: int) -> float:
    """Seconds of one update of sampler ``name`` on a paper-size latent (no model call)."""
    import torch

    from CCELLACore.sampling.samplers import make_sampler
    from CCELLACore.settings import load_config

    sampler = make_sampler(name, load_config("paper").diffusion, steps)
    x = torch.randn(1, 12, *PAPER_LATENT)
    eps = torch.randn_like(x)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for t in sampler.timesteps[:3]:
        x = sampler.step(eps, t, x, g)
    return (time.perf_counter() - started) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed U-Net steps after one warm-up")
    parser.add_argument("--write", action="store_true", help="also write the BENCHMARKS.md section")
    args = parser.parse_args()
    set_threads(args.threads)

    from bench_autoencoder import codec_run
    from bench_unet import build_step

    import torch

    from CCELLACore.precision import choose_dtype, unet_memory_format

    machine = describe_machine(args.threads)
    dtype = choose_dtype("cpu")
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    channels_last = unet_memory_format("cpu", dtype) == torch.channels_last_3d  # as the pipeline runs it
    print(f"U-Net step at the paper size ({precision}, channels-last-3d: {channels_last}) ...", flush=True)
    _, step = build_step(PAPER_LATENT, channels_last=channels_last)
    step(precision)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step(precision)
        times.append(time.perf_counter() - started)
    unet_s = min(times)
    del step
    updates = {name: sampler_update_s(name, n) for name, n in (("ddpm", 1000), ("ddim", 50), ("dpm-solver++", 20))}
    print("light decoder, one 256 x 256 x 128 volume ...", flush=True)
    light_s = codec_run("decode", (256, 256, 128), decoder="light")["seconds"]
    print("full decoder, one 128 x 128 x 64 volume (x8 for 256 x 256 x 128) ...", flush=True)
    full_s = 8 * codec_run("decode", (128, 128, 64), decoder="full")["seconds"]
    end_load = machine_load()

    decode = {"light": light_s, "full": full_s}

    def exam_s(s: dict) -> float:
        return s["steps"] * (unet_s + updates[s["sampler"]]) + 3 * decode[s["decoder"]]

    rows = [f"| {s['sampler']} {s['steps']} steps, {s['decoder']} decoder | {fmt_s(s['steps'] * unet_s)} | "
            f"{fmt_s(3 * decode[s['decoder']])} | {fmt_s(exam_s(s))} | {exam_s(PAPER) / exam_s(s):.0f}x |"
            for s in (PAPER, *ALSO, FAST)]
    layout = ", channels-last-3d" if channels_last else ""
    lines = machine_lines(machine, end_load) + [
        f"- Measured in this run: U-Net step {unet_s:.2f} s ({precision}{layout}, best of {args.steps}); "
        "sampler updates "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in updates.items())
        + f"; light decoder {light_s:.1f} s per 256 x 256 x 128 volume; full decoder {full_s / 8:.1f} s per "
        f"128 x 128 x 64 volume (x8 = {full_s:.0f} s projected per 256 x 256 x 128 volume).",
        "- Exam = steps x (U-Net step + sampler update) + 3 decodes; the report encoding (Flan-T5-XXL) is not "
        "included. PROJECTED from the measured parts, not one end-to-end run.", "",
        "| settings | denoising | 3 decodes | exam | vs paper |", "|---|---|---|---|---|", *rows,
    ]
    print("\n".join(lines))
    if args.write:
        written = write_section('paper_exam', 'Whole paper-size exam: fastest defaults vs the paper',
                                lines, per_machine=True)
        print(f"wrote {written}")
    cpu = f"{machine['cpu']}, {machine['capability']}"
    print(json.dumps({"fast_s": round(exam_s(FAST), 1), "paper_s": round(exam_s(PAPER), 1), "cpu": cpu,
                      "precision": precision + layout.replace(", ", " "), "fast_settings": FAST,
                      "paper_settings": PAPER, "projected": True,
                      "machine_loaded": machine["load_at_start"]["loaded"]}))


if __name__ == "__main__":
    main()
