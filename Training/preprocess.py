"""`ccella preprocess` as a script: `python Training/preprocess.py --help` (also `PythonSlicer Training/preprocess.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("preprocess")
