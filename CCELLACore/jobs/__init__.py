"""Child-process jobs for graphical front ends (the Slicer module): structured progress over stdout.

A GUI must never run a generation on its own thread. It starts ``python -m CCELLACore.jobs <job> ...`` (in Slicer:
``PythonSlicer``) and reads one JSON object per line from the child's stdout (:mod:`.protocol`). Jobs:

- ``generate`` (:mod:`.generate_job`): one exam from a report file, the files ``ccella generate`` writes, with the
  stages load model / encode report / sample (step i of n) / decode / write, and a final ``result`` or ``error``.
- ``model-info`` (:mod:`.model_info`): what a generation model folder offers (samplers, default steps, spacing),
  printed as one ``result`` event.

Nothing here imports torch at import time; :mod:`.protocol` needs only the standard library, so the parent side can
parse events before any optional package is installed.
"""

from .protocol import PROTOCOL_KEY, STAGES, Event, ProgressWriter, parse_line

__all__ = ["PROTOCOL_KEY", "STAGES", "Event", "ProgressWriter", "parse_line"]
