"""Thin wrapper over `ccella phantoms` for `PythonSlicer Training/phantoms.py ...` or `python Training/phantoms.py ...`.

Run `python Training/phantoms.py --help` for the options; the README shows examples.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from CCELLACore.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["phantoms", *sys.argv[1:]]))
