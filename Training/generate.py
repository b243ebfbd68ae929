"""`ccella generate` as a script: `python Training/generate.py --help` (also `torchrun` / `PythonSlicer Training/generate.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("generate")
