"""`ccella synthesize` as a script: `python Training/synthesize.py --help` (also `torchrun` / `PythonSlicer Training/synthesize.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("synthesize")
