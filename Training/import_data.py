"""`ccella import` as a script: `python Training/import_data.py --help` (also `PythonSlicer Training/import_data.py ...`)."""

from _job import run

if __name__ == "__main__":
    run("import")
