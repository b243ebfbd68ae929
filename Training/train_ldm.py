"""`ccella train-ldm` as a script: `python Training/train_ldm.py --help` (also `torchrun` / `PythonSlicer Training/train_ldm.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("train-ldm")
