"""The ``brainsurgery`` console script: hands the arguments to the Rust command line."""

import signal
import sys
from types import FrameType

from brainsurgery import _core

# What `timeout`, `docker stop` and job schedulers send, and what closing a terminal sends.
_CANCELLING = (signal.SIGTERM, signal.SIGHUP)


def main() -> None:
    """Run the command line and exit with its status.

    SIGTERM and SIGHUP cancel like Ctrl-C: the engine stops at its next chunk and removes what it
    started writing; the exit status is then 128 + the signal's number, as a shell reports a
    process the signal ended. A second such signal ends the process at once (the default
    action), for work that checks for cancellation rarely (a prompt waiting for input). A signal
    the process was started ignoring (`nohup`) stays ignored.
    """
    received: list[int] = []

    def cancel(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt

    for signum in _CANCELLING:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, cancel)
    try:
        status = _core.cli_main(sys.argv[1:])
        # Done: a signal now has nothing left to cancel.
        for signum in _CANCELLING:
            signal.signal(signum, signal.SIG_IGN)
    except KeyboardInterrupt:  # before the engine started; it reports interruptions itself
        status = 130
    if received and status == 130:
        status = 128 + received[0]
    sys.exit(status)


if __name__ == "__main__":
    main()
