"""One line instead of a traceback: bad input refused before anything is written (fail, exit status
2), or a run that has begun and cannot go on (stop, exit status 1)."""

import sys

PROGRAM = "train.py"  # who speaks in the line; reward_server.py sets its own name


def fail(message, program=None):
    """Refuse bad input: one line, exit status 2 (program: who speaks, default PROGRAM)."""
    print(f"{program or PROGRAM}: error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(message):
    """End a run that has begun: one line, exit status 1."""
    print(f"{PROGRAM}: stopped: {message}", file=sys.stderr)
    sys.exit(1)
