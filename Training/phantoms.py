"""`ccella phantoms` as a script: `python Training/phantoms.py --help` (also `PythonSlicer Training/phantoms.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("phantoms")
