"""`ccella import-autoencoder` as a script: `python Training/import_autoencoder.py --help` (also `PythonSlicer ...`)."""

from _job import run

if __name__ == "__main__":
    run("import-autoencoder")
