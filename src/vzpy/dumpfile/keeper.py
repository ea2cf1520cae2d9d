"""The FIFOs' keeper: run as a script (no vzpy imports) beside a streamed dump (vzpy.dumpfile.stream).

CRIU opens each pages FIFO with a blocking O_WRONLY open, which waits for a reader. While vzpy lives, its
pump reads them, and vzpy kills the keeper when it is done. If vzpy is killed instead, its read ends close:
CRIU's next open would then wait forever, and its next write would block on a full pipe if anyone but vzpy
held one. So the keeper holds read ends too and, as soon as vzpy's end of the lifeline pipe closes without
vzpy having killed it, drains every FIFO into /dev/null. CRIU then runs to its next notification, finds vzpy
gone and gives up cleanly, as it does without streaming. The keeper stops when the FIFOs' directory is gone
(the CT's next command removes a killed run's scratch directory), when every FIFO has been opened and
closed, or after DRAIN_LIMIT seconds.

argv: lifeline fd, FIFO directory, FIFO fd...
"""

from __future__ import annotations

import os
import select
import sys
import time

DRAIN_LIMIT = 3600.0
POLL_MS = 1000
CHUNK = 1 << 20


def main(argv: list[str]) -> int:
    lifeline, directory, fifos = int(argv[1]), argv[2], [int(fd) for fd in argv[3:]]
    while os.read(lifeline, 1):  # vzpy never writes: this returns (empty) when its end closes
        pass
    drain(fifos, directory, time.monotonic() + DRAIN_LIMIT)
    return 0


def drain(fifos: list[int], directory: str, deadline: float) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    poller = select.poll()
    for fd in fifos:
        poller.register(fd, select.POLLIN)
    live = set(fifos)
    while live and time.monotonic() < deadline and os.path.isdir(directory):
        for fd, _ in poller.poll(POLL_MS):
            try:
                moved = os.splice(fd, devnull, CHUNK)
            except BlockingIOError:
                continue
            if moved == 0:  # CRIU closed it: it does not open a pages image twice
                poller.unregister(fd)
                live.discard(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
