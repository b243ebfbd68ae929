"""`ccella split` as a script: `torchrun Training/split.py ...` (also `PythonSlicer ...`)."""

from _job import run

if __name__ == "__main__":
    run("split")
