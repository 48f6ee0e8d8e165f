"""Progress lines on stderr (stdout carries the Markdown report)."""

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
