"""``python -m CCELLACore.jobs <job> ...``: the child-process jobs a GUI runs (see :mod:`CCELLACore.jobs`)."""

from __future__ import annotations

import sys

JOBS = ("generate", "model-info")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOBS:
        print(f"usage: python -m CCELLACore.jobs {{{','.join(JOBS)}}} ...", file=sys.stderr)
        return 2
    job, rest = argv[0], argv[1:]
    if job == "generate":
        from .generate_job import main as generate_main

        return generate_main(rest)
    from .model_info import main as info_main

    return info_main(rest)


if __name__ == "__main__":
    sys.exit(main())
