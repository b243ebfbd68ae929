"""The study's outputs from its cell results: a results table, mean +- SD per strategy and fraction, paired
statistics and figures (metric against the Institution-2 fraction, one line per strategy with a +-SD band).

Files in ``<out>``::

    results.csv        one row per cell (variant, strategy, percent, trial, n_train, AP, AUC)
    table.csv/.md      mean and SD over trials per variant, percent and strategy (0 % = zero-shot pretrained)
    statistics.csv/.md strategy a minus b per variant and percent: mean-over-trials AUC difference with DeLong's
                       p-value, AP difference with the paired-bootstrap p-value (see :mod:`.stats`)
    figure_<variant>_<ap|auc>.png
    study.json         all of the above as data, with the machine it ran on
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_path, atomic_write_json, atomic_write_text
from .config import StudyConfig
from .runner import percent_label
from .stats import delong_test, paired_bootstrap_ap

__all__ = ["write_report", "summarise", "compare"]

_LABELS = {"scratch": "from scratch", "real": "pretrained on real", "synthetic": "pretrained on synthetic"}
_COLOURS = {"scratch": "tab:grey", "real": "tab:blue", "synthetic": "tab:orange"}


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _groups(results: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["variant"], float(r["fraction"]), r["strategy"])].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: r["trial"])
    return dict(sorted(groups.items()))


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and SD (ddof 1; 0 with one trial) of AP and AUC per (variant, fraction, strategy)."""
    rows = []
    for (variant, fraction, strategy), group in _groups(results).items():
        row: dict[str, Any] = {"variant": variant, "percent": percent_label(fraction), "strategy": strategy,
                               "trials": len(group), "n_train": group[0]["n_train"]}
        for metric in ("ap", "auc"):
            values = np.array([g[metric] for g in group], float)
            row[f"{metric}_mean"] = float(np.mean(values))
            row[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def compare(config: StudyConfig, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired comparisons of ``statistics.pairs`` wherever both strategies have results (at 0 %: real vs
    synthetic zero-shot). All cells share Institution 2's test cases, in one order."""
    groups = _groups(results)
    rows = []
    for (variant, fraction, strategy_a), group_a in groups.items():
        for a, b in config.statistics.pairs:
            group_b = groups.get((variant, fraction, b))
            if a != strategy_a or group_b is None:
                continue
            cases = group_a[0]["test"]["case_ids"]
            if any(g["test"]["case_ids"] != cases for g in group_a + group_b):
                raise ValueError(f"{variant} {percent_label(fraction)}%: cells were tested on different cases")
            labels = group_a[0]["test"]["labels"]
            scores_a = [g["test"]["scores"] for g in group_a]
            scores_b = [g["test"]["scores"] for g in group_b]
            auc = delong_test(labels, scores_a, scores_b)
            ap = paired_bootstrap_ap(labels, scores_a, scores_b, config.statistics.bootstrap, config.statistics.seed)
            rows.append({"variant": variant, "percent": percent_label(fraction), "a": a, "b": b,
                         "trials": min(len(group_a), len(group_b)),
                         "auc_difference": auc.difference, "auc_ci_low": auc.ci_low, "auc_ci_high": auc.ci_high,
                         "auc_p_delong": auc.p_value,
                         "ap_difference": ap.difference, "ap_ci_low": ap.ci_low, "ap_ci_high": ap.ci_high,
                         "ap_p_bootstrap": ap.p_value})
    return rows


def _pm(mean: float, sd: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _markdown_table(config: StudyConfig, summary: list[dict[str, Any]]) -> str:
    lines = []
    index = {(r["variant"], r["percent"], r["strategy"]): r for r in summary}
    percents = ["0"] + [percent_label(f) for f in sorted(config.fractions)]
    for variant, seqs in config.variants.items():
        lines += [f"### {variant} ({' + '.join(seqs)})", "",
                  "| Institution 2 train | " + " | ".join(f"AP {s}" for s in config.strategies) + " | "
                  + " | ".join(f"AUC {s}" for s in config.strategies) + " |",
                  "|---" * (1 + 2 * len(config.strategies)) + "|"]
        for percent in percents:
            cells = []
            for metric in ("ap", "auc"):
                for s in config.strategies:
                    r = index.get((variant, percent, s))
                    cells.append("" if r is None else _pm(r[f"{metric}_mean"], r[f"{metric}_sd"]))
            if any(cells):
                n = next((index[(variant, percent, s)]["n_train"] for s in config.strategies
                          if (variant, percent, s) in index), "")
                what = "0 % (zero-shot)" if percent == "0" else f"{percent} % ({n} exams)"
                lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _markdown_statistics(stats: list[dict[str, Any]]) -> str:
    lines = ["| variant | % | a - b | ΔAUC (95 % CI) | p (DeLong) | ΔAP (95 % CI) | p (bootstrap) |",
             "|---|---|---|---|---|---|---|"]
    for r in stats:
        lines.append(f"| {r['variant']} | {r['percent']} | {r['a']} - {r['b']} | {r['auc_difference']:+.3f} "
                     f"({r['auc_ci_low']:+.3f}, {r['auc_ci_high']:+.3f}) | {_p(r['auc_p_delong'])} | "
                     f"{r['ap_difference']:+.3f} ({r['ap_ci_low']:+.3f}, {r['ap_ci_high']:+.3f}) | "
                     f"{_p(r['ap_p_bootstrap'])} |")
    return "\n".join(lines) + "\n"


def _figures(config: StudyConfig, summary: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smallest = math.log2(100.0 * min(config.fractions))
    zero_x = smallest - 1.0  # the 0 % point, one halving left of the smallest fraction

    def x_of(percent: str) -> float:
        return zero_x if percent == "0" else math.log2(float(percent))

    names = []
    for variant, seqs in config.variants.items():
        for metric, title in (("ap", "AP"), ("auc", "AUC")):
            fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
            for strategy in config.strategies:
                rows = sorted((r for r in summary if r["variant"] == variant and r["strategy"] == strategy),
                              key=lambda r: x_of(r["percent"]))
                if not rows:
                    continue
                x = np.array([x_of(r["percent"]) for r in rows])
                mean = np.array([r[f"{metric}_mean"] for r in rows])
                sd = np.array([r[f"{metric}_sd"] for r in rows])
                ax.plot(x, mean, "o-", color=_COLOURS[strategy], label=_LABELS[strategy])
                ax.fill_between(x, mean - sd, mean + sd, color=_COLOURS[strategy], alpha=0.2, linewidth=0)
            ticks = [zero_x] + [math.log2(100.0 * f) for f in sorted(config.fractions)]
            ax.set_xticks(ticks, ["0"] + [percent_label(f) for f in sorted(config.fractions)])
            ax.set_xlabel("Institution 2 training data (%)")
            ax.set_ylabel(f"{title} on Institution 2 test set")
            ax.set_title(f"{title}: {' + '.join(seqs)} (mean ± SD over {config.trials} trial(s))", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
            fig.tight_layout()
            name = f"figure_{variant}_{metric}.png"
            with atomic_path(out / name, suffix=".png") as tmp:
                fig.savefig(tmp)
            plt.close(fig)
            names.append(name)
    return names


def write_report(config: StudyConfig, results: list[dict[str, Any]], out: str | Path) -> dict[str, Any]:
    """Write every output listed in the module docstring; returns the ``study.json`` content."""
    from ..precision import cpu_model_name

    out = Path(out)
    flat = [{"variant": r["variant"], "strategy": r["strategy"], "percent": percent_label(r["fraction"]),
             "trial": r["trial"], "n_train": r["n_train"], "ap": r["ap"], "auc": r["auc"], "seconds": r["seconds"]}
            for r in results]
    summary = summarise(results)
    stats = compare(config, results)
    atomic_write_text(out / "results.csv", _csv(flat))
    atomic_write_text(out / "table.csv", _csv(summary))
    atomic_write_text(out / "table.md", _markdown_table(config, summary))
    atomic_write_text(out / "statistics.csv", _csv(stats))
    atomic_write_text(out / "statistics.md", _markdown_statistics(stats))
    figures = _figures(config, summary, out)
    report = {"complete": True, "cells": len(results), "test_exams": len(results[0]["test"]["case_ids"]),
              "machine": cpu_model_name(), "hours": round(sum(r["seconds"] for r in results) / 3600.0, 3),
              "table": summary, "statistics": stats, "figures": figures}
    atomic_write_json(out / "study.json", report)
    return report
