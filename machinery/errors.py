"""One line instead of a traceback: bad input refused before anything is written (fail, exit status
2), or a run that has begun and cannot go on (stop, exit status 1)."""

import contextlib
import sys

PROGRAM = "train.py"  # who speaks in the line (speaking_as)


@contextlib.contextmanager
def speaking_as(program):
    """Within (a with block, or a function it decorates), fail's and stop's lines say program;
    PROGRAM is restored after, so a process that runs several programs' mains keeps each its own
    (the tests do)."""
    global PROGRAM
    before, PROGRAM = PROGRAM, program
    try:
        yield
    finally:
        PROGRAM = before


def fail(message):
    """Refuse bad input: one line, exit status 2."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(message):
    """End a run that has begun: one line, exit status 1."""
    print(f"{PROGRAM}: stopped: {message}", file=sys.stderr)
    sys.exit(1)
