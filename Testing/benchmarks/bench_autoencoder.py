"""Encode and decode time and peak memory: full MAISI decoder, light [16, 32, 64] decoder, tiled decoding; and how
they grow with the volume (64 to 256 in-plane). Paper-config autoencoder with random weights (timing and memory do
not depend on them). Each row runs in a fresh process, so its peak resident memory is its own.

The untiled full decoder at 256 x 256 x 128 takes ~6 minutes and more memory than this shared machine can spare, so
it is measured at 64 and 128 in-plane and projected (x8 voxels per doubling: convolution work and activations are
linear in voxels); tiled decoding is measured whole at 256 x 256 x 128 with the light decoder, and for the full
decoder as one 32^3-latent tile (what bounds its peak memory) times the number of tiles.

Usage (about 10-20 minutes on 2 loaded cores)::

    PYTHONPATH=. python Testing/benchmarks/bench_autoencoder.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import math

from _common import describe_machine, fmt_s, isolated, machine_lines, machine_load, table, write_section

TILE = (32, 32, 32)  # latent voxels: 128^3 output voxels
OVERLAP = 0.25


def codec_run(op: str, volume: tuple[int, int, int], decoder: str = "full", precision: str = "auto",
              tile: tuple[int, int, int] | None = None, config: str = "paper") -> dict:
    """Time one encode or decode of a single-sequence volume of ``volume`` voxels (random weights and input)."""
    import time

    import torch

    from CCELLACore.models.autoencoder import build_autoencoder
    from CCELLACore.models.light_decoder import DecodeTiling, LightDecoder, LightDecoderConfig, SequenceCodec
    from CCELLACore.precision import choose_dtype
    from CCELLACore.settings import load_config

    torch.manual_seed(0)
    cfg = load_config(config).autoencoder
    ae = build_autoencoder(cfg)
    light = LightDecoder(LightDecoderConfig.from_teacher(cfg)) if decoder == "light" else None
    dtype = choose_dtype("cpu") if precision == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    codec = SequenceCodec(ae, "cpu", dtype, light_decoder=light,
                          tiling=DecodeTiling(tile, OVERLAP) if tile else None)
    f = cfg.downsample_factor
    if op == "encode":
        x = torch.rand(1, 1, *volume)
        run = lambda: codec.encode(x)  # noqa: E731
    else:
        z = torch.randn(1, cfg.latent_channels, *(s // f for s in volume))
        run = lambda: codec.decode(z)  # noqa: E731
    started = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - started, "dtype": str(dtype).replace("torch.", "")}


def n_tiles(latent: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding window places: per axis 1 + ceil((size - roi) / interval)."""
    count = 1
    for size, r in zip(latent, roi):
        r = min(r, size)
        interval = max(int(r * (1 - overlap)), 1)
        count *= 1 + (math.ceil((size - r) / interval) if size > r else 0)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the rows the 6 GiB projection needs")
    parser.add_argument("--fp32", action="store_true", help="also decode in fp32 (the bf16 ratio of the decoder)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    machine = describe_machine(args.threads)
    v64, v128, v256 = (64, 64, 32), (128, 128, 64), (256, 256, 128)
    plan = [
        ("encode", "full", v128, "auto", None),
        ("decode", "full", v64, "auto", None), ("decode", "full", v128, "auto", None),
        ("decode", "light", v128, "auto", None), ("decode", "light", v256, "auto", None),
        ("decode", "light", v256, "auto", TILE),
        ("decode", "full", (128, 128, 128), "auto", None),  # = one 32^3-latent tile of the full decoder
    ]
    if args.quick:  # what the 6 GiB question needs: the light decoder whole, one full-decoder tile, growth x8
        plan = [p for p in plan if p[0] == "decode" and p[2] in (v128, v256, (128, 128, 128)) and not p[4]
                and not (p[1] == "light" and p[2] == v128)]
    if args.fp32:
        plan.append(("decode", "full", v128, "fp32", None))
    results = []
    for op, decoder, volume, precision, tile in plan:
        print(f"{op} {decoder} {volume} {precision} tile={tile} ...", flush=True)
        r = isolated(codec_run, args.threads, op=op, volume=volume, decoder=decoder, precision=precision, tile=tile)
        print(json.dumps(r), flush=True)
        results.append(((op, decoder, volume, precision, tile), r))
    end_load = machine_load()

    def get(op, decoder, volume, precision="auto", tile=None):
        return dict(results)[(op, decoder, volume, precision, tile)]

    rows = []
    for (op, decoder, volume, precision, tile), r in results:
        name = f"{op}, {decoder} decoder" if op == "decode" else "encode (full encoder)"
        if tile:
            name += f", tiles {tile[0]}^3 latent, overlap {OVERLAP}"
        rows.append([name, " x ".join(map(str, volume)), r.get("dtype", precision), fmt_s(r.get("seconds")),
                     f"{r['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in r else r.get("error", "-"), "measured"])
    # Projections to the paper's volume (x8 voxels from 128 x 128 x 64).
    full128 = get("decode", "full", v128)
    tile_run = get("decode", "full", (128, 128, 128))
    latent = (64, 64, 32)
    tiles = n_tiles(latent, TILE, OVERLAP)
    base = full128.get("baseline_rss_gib", 0.3)
    if "seconds" in full128:
        rows.append(["decode, full decoder, untiled", "256 x 256 x 128", full128["dtype"],
                     fmt_s(8 * full128["seconds"]), f"~{base + 8 * full128['peak_above_baseline_gib']:.1f} GiB",
                     "projected: 8 x the 128 x 128 x 64 row"])
    enc128 = dict(results).get(("encode", "full", v128, "auto", None), {})
    if "seconds" in enc128:
        rows.append(["encode (full encoder)", "256 x 256 x 128", enc128["dtype"], fmt_s(8 * enc128["seconds"]),
                     f"~{base + 8 * enc128['peak_above_baseline_gib']:.1f} GiB", "projected: 8 x 128 x 128 x 64"])
    if "seconds" in tile_run:
        buffers = 3 * 256 * 256 * 128 * 4 / 2 ** 30  # output, count map and blending weights, fp32
        rows.append([f"decode, full decoder, tiles {TILE[0]}^3 latent, overlap {OVERLAP}", "256 x 256 x 128",
                     tile_run["dtype"], fmt_s(tiles * tile_run["seconds"]),
                     f"~{tile_run['peak_rss_gib'] + buffers:.1f} GiB",
                     f"projected: {tiles} tiles x the 128^3 row; peak = one tile + {buffers:.2f} GiB of buffers"])
    light256, full_s = get("decode", "light", v256), 8 * full128.get("seconds", float("nan"))
    lines = machine_lines(machine, end_load) + [
        "- Autoencoder: paper config (MAISI [64, 128, 256], 2 res blocks, num_splits 2), random weights; light "
        "decoder [16, 32, 64], 2 res blocks; one single-sequence volume per row (an exam has three); precision "
        "'auto' = bf16 where native. Peak = the process's peak resident memory (Python and torch included, "
        f"~{base:.1f} GiB before the model).", "",
        *table(["what", "volume", "precision", "time", "peak memory", "how"], rows), "",
    ]
    light128 = dict(results).get(("decode", "light", v128, "auto", None), {})
    if "seconds" in light256 and math.isfinite(full_s):
        lines.append(f"Light vs full decoder at 256 x 256 x 128: {full_s / light256['seconds']:.1f}x faster "
                     "(full projected x8 from 128 x 128 x 64).")
    if "seconds" in light128 and "seconds" in full128:
        lines.append(f"At 128 x 128 x 64, measured side by side: {full128['seconds'] / light128['seconds']:.1f}x.")
    fp32 = dict(results).get(("decode", "full", v128, "fp32", None), {})
    if "seconds" in fp32 and "seconds" in full128 and full128["dtype"] != "float32":
        lines.append(f"Full decoder bf16 vs fp32 at 128 x 128 x 64: {fp32['seconds'] / full128['seconds']:.2f}x "
                     f"faster, peak {full128['peak_rss_gib']:.2f} vs {fp32['peak_rss_gib']:.2f} GiB.")
    print("\n".join(lines))
    if not args.no_write:
        written = write_section('autoencoder', 'Encode and decode: full, light and tiled',
                                lines, per_machine=True)
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
