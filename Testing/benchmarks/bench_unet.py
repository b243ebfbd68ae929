"""U-Net step time and peak memory at the paper's size (fp32; bf16 where native; channels-last-3d; torch.compile),
and how the step cost grows with the volume (64 to 256 in-plane). Random weights: timing does not depend on them.

One step = one forward of the CCELLA adapter + U-Net (batch 1, guidance 1: the paper trains without condition
dropout) on a 12 x 64 x 64 x 32 latent with 512 text tokens of 4096 features (Flan-T5-XXL's width). The variants
run interleaved in one process (see ``_common.interleaved``), so a load that changes over minutes slows them alike.

Usage (about 10-20 minutes on 2 loaded cores; ``--rounds 1`` and ``--no-compile`` save time)::

    PYTHONPATH=. python Testing/benchmarks/bench_unet.py --threads 2
"""

from __future__ import annotations

import argparse
import json

from _common import (GIB, PAPER_LATENT, describe_machine, fmt_s, interleaved, isolated, machine_lines,
                     machine_load, paired_ratio, set_threads, table, write_section)


def build_step(latent: tuple[int, int, int], config: str = "paper", channels_last: bool = False):
    """(model, step(dtype_name) -> prediction) for the model of ``config`` with random weights."""
    import torch

    from CCELLACore.models.ldm import CCELLALDM
    from CCELLACore.precision import autocast_context
    from CCELLACore.settings import load_config

    torch.manual_seed(0)
    cfg = load_config(config)
    model = CCELLALDM(cfg.ldm).eval()
    x = torch.randn(1, cfg.ldm.unet.in_channels, *latent)
    tokens = cfg.text_encoder.max_tokens
    text = torch.randn(1, tokens, cfg.ldm.adapter.input_dim)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    spacing, t = torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([500.0])
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def step(dtype: str, net=None):
        with torch.no_grad(), autocast_context("cpu", dtypes[dtype]):
            # `net or model` would ask a compiled module for its truth value, which it does not have
            return (model if net is None else net)(x, t, spacing, text, mask).prediction

    return model, step


def compiled_vs_eager(latent: tuple[int, int, int], dtype: str, config: str, rounds: int) -> dict:
    """torch.compile (inductor) against eager in one process, interleaved; the compile time separately."""
    import time

    import torch

    from _common import interleaved, paired_ratio

    model, step = build_step(latent, config)
    compiled = torch.compile(model)
    started = time.perf_counter()
    step(dtype, compiled)
    compile_s = time.perf_counter() - started
    res = interleaved({"eager": lambda: step(dtype), "compiled": lambda: step(dtype, compiled)}, rounds)
    return {"compile_s": compile_s, "eager_s": res["eager"]["median_s"], "compiled_s": res["compiled"]["median_s"],
            "speedup": paired_ratio(res, "eager", "compiled")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    parser.add_argument("--compile-timeout", type=float, default=600.0, help="seconds for the compile comparison")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    import torch

    from CCELLACore.precision import cpu_has_native_bf16

    set_threads(args.threads)
    machine = describe_machine(args.threads)
    native = cpu_has_native_bf16()
    dtypes = ("fp32", "bf16") if native else ("fp32",)
    # 1. Paper size: every variant interleaved in this one process.
    model, step = build_step(PAPER_LATENT)
    model_cl, step_cl = build_step(PAPER_LATENT, channels_last=True)
    runs = {}
    for d in dtypes:
        runs[d] = lambda d=d: step(d)
        runs[f"{d} channels-last-3d"] = lambda d=d: step_cl(d)
    print(f"paper size: {list(runs)} x {args.rounds} rounds ...", flush=True)
    paper = interleaved(runs, args.rounds)
    print(json.dumps(paper), flush=True)
    params = sum(p.numel() for p in model.parameters())
    del model, model_cl, step, step_cl, runs
    # 2. Growth with the volume.
    growth = {64: paper}
    for side in (16, 32):
        _, small = build_step((side, side, side // 2))
        growth[side] = interleaved({d: (lambda d=d: small(d)) for d in dtypes}, args.rounds)
    # 3. torch.compile at the demo size (compiling the paper U-Net on 2 cores takes far longer than a run).
    comp = None
    if not args.no_compile:
        print("torch.compile vs eager (demo config) ...", flush=True)
        comp = isolated(compiled_vs_eager, args.threads, timeout_s=args.compile_timeout, latent=(16, 16, 8),
                        dtype=dtypes[-1], config="demo", rounds=3)
        print(json.dumps(comp), flush=True)
    end_load = machine_load()

    rows = []
    for name, r in paper.items():
        ratio = paired_ratio(paper, "fp32", name)
        rows.append([name, fmt_s(r["median_s"]), f"{ratio:.2f}x", f"{r['peak_rise_gib']:.2f} GiB"])
    weights_gib = params * 4 / GIB
    lines = machine_lines(machine, end_load) + [
        f"- Model: paper config, adapter + U-Net {params / 1e6:.0f} M parameters ({weights_gib:.2f} GiB fp32), "
        "random weights; latent 12 x 64 x 64 x 32 (volume 256 x 256 x 128), 512 text tokens x 4096, batch 1, "
        f"guidance 1. Variants interleaved in one process: one warm-up round, then {args.rounds} rounds in "
        "rotating order; speed-up = median of the per-round time ratios (robust to a load that changes over "
        "minutes); memory = the largest rise of resident memory during one step (activations) on top of the "
        "weights.", "",
        *table(["variant", "U-Net step (median)", "speed-up vs fp32", "activation memory"], rows), "",
        "Cost growth with the volume (in-plane side; latent = volume / 4; same run):", "",
    ]
    grow_rows = []
    for side in (16, 32, 64):
        for d in dtypes:
            r = growth[side][d]
            grow_rows.append([f"{side * 4} x {side * 4} x {side * 2}", d, fmt_s(r["median_s"]),
                              f"{r['median_s'] / growth[16][d]['median_s']:.1f}x", f"{r['peak_rise_gib']:.2f} GiB"])
    lines += table(["volume", "precision", "U-Net step", "vs 64-side volume", "activation memory"], grow_rows)
    lines += ["", "(Voxels grow 8x per doubling of the side, 64x from the 64-side to the 256-side volume.)"]
    if comp is not None:
        if "error" in comp:
            lines += ["", f"torch.compile (inductor, demo-size U-Net, {dtypes[-1]}): not measured: {comp['error']}."]
        else:
            lines += ["", f"torch.compile (inductor) on the demo-size U-Net (latent 12 x 16 x 16 x 8, {dtypes[-1]}): "
                      f"compiling took {fmt_s(comp['compile_s'])}; step {fmt_s(comp['compiled_s'])} compiled vs "
                      f"{fmt_s(comp['eager_s'])} eager = {comp['speedup']:.2f}x."]
    print("\n".join(lines))
    if not args.no_write:
        written = write_section('unet', 'U-Net step (paper size) and cost growth with volume size',
                                lines, per_machine=True)
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
