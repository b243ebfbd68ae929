"""`ccella encode` as a script: `python Training/encode.py --help` (also `torchrun` / `PythonSlicer Training/encode.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("encode")
