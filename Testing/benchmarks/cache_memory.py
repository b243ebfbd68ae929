"""Peak memory per DDP rank of train-ldm's training data, measured and extrapolated to 4 000 paper-size exams.

Run (not a test; about 3-6 minutes on 2 cores)::

    python Testing/benchmarks/cache_memory.py [--counts 500 1000 2000] [--paper-counts 16 32] [--out DIR]

Each measurement is a fresh process (one per rank) that builds the real training data
(:func:`~CCELLACore.training.latents.load_latent_data`), streams its share of the scale-factor statistics and reads
every batch of one epoch that its rank trains on, exactly as ``train_ldm`` does; its peak resident memory (VmHWM)
minus the memory after the imports is the figure. Two loaders are compared on caches written by the real writers:

- ``mapped`` (CCELLACore today): fp16 files read per batch through memory maps;
- ``in-memory`` (CCELLACore before issue 19): every latent (fp32) and every report padded to ``max_tokens`` (fp32)
  stacked in each rank's memory.

Tiny volumes at several counts give the growth per exam; paper-size volumes (latent 12 x 64 x 64 x 32, reports of
512 tokens of 4096-d Flan-T5-XXL features) at small counts give the size-dependent part. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TINY = {"latent": (12, 8, 8, 4), "tokens": 200, "max_tokens": 256, "dim": 384}  # the tiny config's
PAPER = {"latent": (12, 64, 64, 32), "tokens": 512, "max_tokens": 512, "dim": 4096}  # 256x256x128, Flan-T5-XXL
BATCH, WORLD, TARGET = 8, 2, 4000


def _status(key: str) -> int:
    """/proc/self/status value in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _studies(n: int):
    from CCELLACore.data.study import Study

    return [Study(case_id=f"c{i:05d}", patient_id=f"p{i:05d}", images={"AxT2": Path(f"c{i:05d}.nii.gz")},
                  report="report", label=i % 2, split="train") for i in range(n)]


def write_caches(root: Path, n: int, size: dict) -> None:
    """n exams' latent and text caches in the formats train-ldm writes (random values)."""
    import torch

    from CCELLACore.fileio import atomic_write_json
    from CCELLACore.models.encode_cli import INDEX_FILE, NULL_FILE, _save_encoding
    from CCELLACore.training.latents import write_latent_file

    (root / "latents").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lesion = torch.zeros((1, *size["latent"][1:]))
    cases = {}
    for study in _studies(n):
        write_latent_file(root / "latents" / f"{study.case_id}.safetensors", torch.randn(size["latent"], generator=g),
                          torch.tensor([0.5, 0.5, 0.5]), lesion)
        _save_encoding(root / "text" / f"{study.case_id}.safetensors",
                       torch.randn(size["tokens"], size["dim"], generator=g), {})
        cases[study.case_id] = {"report_hash": "-", "n_tokens": size["tokens"], "truncated_tokens": 0}
    _save_encoding(root / "text" / NULL_FILE, torch.zeros(1, size["dim"]), {})
    atomic_write_json(root / "text" / INDEX_FILE, {
        "format": 1, "encoder": "benchmark", "feature_dim": size["dim"], "dtype": "float16",
        "max_tokens": size["max_tokens"], "null": {"file": NULL_FILE, "n_tokens": 1}, "cases": cases})


def worker(root: Path, n: int, rank: int, mode: str) -> dict:
    """One rank's data path over one epoch; returns its peak memory above the post-import baseline."""
    import torch

    from CCELLACore.models.encode_cli import EncodingCache
    from CCELLACore.training.distributed import DistributedContext
    from CCELLACore.training.latents import latent_stats, load_latent_data
    from CCELLACore.training.ldm import latent_batch

    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    ctx = DistributedContext(rank=rank, world_size=WORLD)
    cache = EncodingCache(root / "text")
    data = load_latent_data(_studies(n), root / "latents", cache)
    steps = math.ceil(n / (BATCH * WORLD))
    checksum = 0.0
    if mode == "mapped":
        latent_stats(data, ("AxT2", "HighB", "ADC"), ctx)
        for step in range(steps):
            batch = data.read(latent_batch(data, step, BATCH, WORLD, seed=0)[rank::WORLD])
            checksum += float(batch.latents[:, 0, 0, 0, 0].sum()) + float(batch.text.features[:, 0, 0].sum())
            del batch  # as in train_ldm, where a step's batch is gone before the next is read
    else:  # the loader before issue 19: everything stacked in fp32, reports padded to max_tokens
        from safetensors.torch import load_file

        latents = torch.stack([load_file(str(p))["latent"].float() for p in data.latent_files])
        features = torch.cat([cache.load(c, cache.max_tokens).features for c in data.case_ids])
        for step in range(steps):
            index = latent_batch(data, step, BATCH, WORLD, seed=0)[rank::WORLD]
            checksum += float(latents[index, 0, 0, 0, 0].sum()) + float(features[index, 0, 0].sum())
    return {"peak_bytes": _status("VmHWM") - baseline, "checksum": checksum}


def _measure(root: Path, n: int, mode: str) -> int:
    """The largest peak over the ranks (each rank a fresh process)."""
    peaks = []
    for rank in range(WORLD if mode == "mapped" else 1):  # in-memory: every rank holds the same
        out = subprocess.run([sys.executable, __file__, "--worker", str(root), str(n), str(rank), mode],
                             capture_output=True, text=True, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])
    return max(peaks)


def _fit(counts: list[int], peaks: list[int]) -> tuple[float, float]:
    """Least-squares line peak = a + b * n."""
    import numpy as np

    b, a = np.polyfit(np.asarray(counts, float), np.asarray(peaks, float), 1)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 1000, 2000], help="tiny-volume exam counts")
    parser.add_argument("--paper-counts", type=int, nargs="+", default=[16, 32], help="paper-size exam counts")
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: a temporary one)")
    args = parser.parse_args()
    from CCELLACore.precision import cpu_model_name

    GiB, MiB = 2.0 ** 30, 2.0 ** 20
    start = time.time()
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        results: dict = {"cpu": cpu_model_name(), "world_size": WORLD, "batch_per_rank": BATCH, "target_exams": TARGET}
        for name, size, counts in (("tiny", TINY, args.counts), ("paper", PAPER, args.paper_counts)):
            for mode in ("mapped", "in-memory"):
                peaks = []
                for n in counts:
                    root = Path(tmp) / f"{name}_{n}"
                    if not root.exists():
                        write_caches(root, n, size)
                    peaks.append(_measure(root, n, mode))
                    print(f"{name:5s} {mode:9s} {n:5d} exams: peak {peaks[-1] / MiB:8.1f} MiB per rank", flush=True)
                results[f"{name}_{mode}"] = dict(zip(map(str, counts), peaks))
        # Extrapolation: per-exam growth from the widest range of counts at each size, plus the paper-size level.
        a_map, b_map_tiny = _fit(args.counts, list(results["tiny_mapped"].values()))
        paper_counts = args.paper_counts
        a_pmap, b_pmap = _fit(paper_counts, list(results["paper_mapped"].values()))
        a_pmem, b_pmem = _fit(paper_counts, list(results["paper_in-memory"].values()))
        # A negative fitted growth is measurement noise (no per-exam state grows): project it as 0.
        mapped_4000 = a_pmap + b_pmap * paper_counts[0] + max(b_map_tiny, 0.0) * (TARGET - paper_counts[0])
        memory_4000 = a_pmem + b_pmem * TARGET
        results.update({
            "mapped_growth_bytes_per_exam": b_map_tiny,
            "in_memory_growth_bytes_per_exam_paper": b_pmem,
            "mapped_peak_gib_4000_paper": mapped_4000 / GiB,
            "in_memory_peak_gib_4000_paper": memory_4000 / GiB,
            "seconds": round(time.time() - start, 1),
        })
    print(f"growth per exam: mapped {b_map_tiny / 1024:.1f} KiB (any volume size), in-memory {b_pmem / MiB:.1f} MiB "
          f"at paper size")
    print(f"peak per rank, {TARGET} paper-size exams: mapped {mapped_4000 / GiB:.2f} GiB, in-memory "
          f"{memory_4000 / GiB:.1f} GiB")
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
    else:
        main()
