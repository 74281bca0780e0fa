"""The ``brainsurgery`` console script: hands the arguments to the Rust command line."""

import signal
import sys
from types import FrameType

from brainsurgery import _core


def main() -> None:
    """Run the command line and exit with its status.

    SIGTERM (what ``timeout``, ``docker stop`` and job schedulers send) and SIGHUP cancel like
    Ctrl-C: the engine stops at its next chunk and removes what it started writing. The exit
    status is then 128 + the signal's number, as a shell reports a process the signal ended.
    """
    received: list[int] = []

    def cancel(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, cancel)
    try:
        status = _core.cli_main(sys.argv[1:])
    except KeyboardInterrupt:  # before the engine started; it reports interruptions itself
        status = 130
    if received and status == 130:
        status = 128 + received[0]
    sys.exit(status)


if __name__ == "__main__":
    main()
