"""`ccella train-classifier` as a script: `torchrun Training/train_classifier.py ...` (also `PythonSlicer ...`)."""

from _job import run

if __name__ == "__main__":
    run("train-classifier")
