"""Training throughput with cached latents vs encoding every batch on the fly (demo config, random weights).

``ccella train-ldm`` caches each exam's latents (and report features) once and trains on the cache; the other way
encodes the three sequences of every exam of every batch with the autoencoder again. One step = adapter + U-Net
forward, MSE loss, backward and AdamW, batch 8 (the demo's), fp32 (CPU training precision); both variants
interleaved in one process (``_common.interleaved``).

Usage (a few minutes)::

    PYTHONPATH=. python Testing/benchmarks/bench_training.py --threads 2
"""

from __future__ import annotations

import argparse
import json

from _common import describe_machine, fmt_s, interleaved, machine_lines, machine_load, paired_ratio, set_threads
from _common import table, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    machine = describe_machine(args.threads)

    import torch

    from CCELLACore.models.autoencoder import SequenceAutoencoder, build_autoencoder
    from CCELLACore.models.ldm import CCELLALDM
    from CCELLACore.settings import load_config

    torch.manual_seed(0)
    cfg = load_config("demo")
    grid = tuple(cfg.preprocess.ldm.grid.size)
    f = cfg.autoencoder.downsample_factor
    latent = (args.batch, cfg.ldm.unet.in_channels, *(s // f for s in grid))
    model = CCELLALDM(cfg.ldm).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codec = SequenceAutoencoder(build_autoencoder(cfg.autoencoder), "cpu", torch.float32)
    tokens = cfg.text_encoder.max_tokens
    text = torch.randn(args.batch, tokens, cfg.ldm.adapter.input_dim)
    mask = torch.ones(args.batch, tokens, dtype=torch.bool)
    spacing = torch.tensor([list(cfg.preprocess.ldm.grid.spacing)] * args.batch)
    cached = torch.randn(latent)
    volumes = torch.rand(args.batch, len(cfg.sequences), *grid)

    def train_step(z: torch.Tensor) -> None:
        t = torch.randint(0, 1000, (args.batch,)).float()
        noise = torch.randn_like(z)
        out = model(z + noise, t, spacing, text, mask).prediction
        loss = (out - noise).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    res = interleaved({"cached latents": lambda: train_step(cached),
                       "encode every batch": lambda: train_step(codec.encode_sequences(volumes))}, args.rounds)
    print(json.dumps(res), flush=True)
    end_load = machine_load()
    ratio = paired_ratio(res, "encode every batch", "cached latents")
    rows = [[name, fmt_s(r["median_s"]), f"{args.batch / r['median_s']:.1f} exams/s",
             f"{r['peak_rise_gib']:.2f} GiB"] for name, r in res.items()]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    lines = machine_lines(machine, end_load) + [
        f"- Demo config (volumes {' x '.join(map(str, grid))}, latent {' x '.join(map(str, latent[1:]))}, "
        f"adapter + U-Net {params:.1f} M parameters), batch {args.batch}, fp32, random weights; median of "
        f"{args.rounds} interleaved rounds after a warm-up.", "",
        *table(["training step", "time", "throughput", "memory rise in a step"], rows), "",
        f"Cached latents train {ratio:.2f}x faster per step than encoding every batch (paired per round).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        print(f"wrote {write_section('training', 'Training throughput with cached latents', lines)}")


if __name__ == "__main__":
    main()
