"""`ccella classify` as a script: `torchrun Training/classify.py ...` (also `PythonSlicer ...`)."""

from _job import run

if __name__ == "__main__":
    run("classify")
