"""`ccella train-autoencoder` as a script: `torchrun Training/train_autoencoder.py ...` (also `PythonSlicer ...`)."""

from _job import run

if __name__ == "__main__":
    run("train-autoencoder")
