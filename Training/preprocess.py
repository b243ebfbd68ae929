"""Thin wrapper over `ccella preprocess` for `PythonSlicer Training/preprocess.py ...` or `python Training/preprocess.py ...`.

Run `python Training/preprocess.py --help` for the options; the README shows examples.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from CCELLACore.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
