"""``ccella import``: read a data layout and write the project's manifest plus a summary.

Usage::

    ccella import /data/picai --out picai_manifest.csv
    ccella import /data/prostate158 --layout prostate158 --out p158.csv --summary p158_summary.json --check-images

The summary JSON counts studies per institution, split, label and label source, patients and patients with several
studies, and lists every skipped case with its reason and every warning (unknown columns, inconsistent entries).
Nothing here prints report text or patient identifiers beyond case ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..layouts import LAYOUTS, import_layout
from ..manifest import write_manifest

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="the data set's root folder (or a manifest CSV / an authors' JSON file)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="skip detection and read this layout")
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write (paths relative to it)")
    parser.add_argument("--summary", type=Path, default=None, help="summary JSON (default: <out>.summary.json)")
    parser.add_argument(
        "--check-images", action="store_true", help="also read every image header and skip unreadable or non-3D files"
    )


def run(args: argparse.Namespace) -> int:
    studies, summary = import_layout(args.src, args.layout, check_images=args.check_images)
    summary_path = args.summary or args.out.with_name(args.out.stem + ".summary.json")
    summary.details["manifest"] = str(args.out)
    summary.write(summary_path)
    if studies:
        write_manifest(studies, args.out)
    details = summary.details
    print(f"layout {details['layout']}: {details['n_studies']} studies of {details['n_patients']} patients "
          f"({details['n_patients_with_several_studies']} with several studies), {len(summary.skipped)} skipped, "
          f"{len(details['warnings'])} warning(s)")
    for key, title in (("per_split", "split"), ("per_institution", "institution"), ("per_label", "label"),
                       ("per_label_source", "label source")):
        print(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in details[key].items()))
    for skipped in summary.skipped[:10]:
        print(f"  skipped {skipped.case_id}: {skipped.reason}")
    if len(summary.skipped) > 10:
        print(f"  ... {len(summary.skipped) - 10} more skipped cases in {summary_path}")
    if not studies:
        print(f"no study could be imported; no manifest written (see {summary_path})")
        return 1
    print(f"wrote {args.out} and {summary_path}")
    return 0
