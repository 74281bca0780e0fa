"""The ``brainsurgery`` console script: hands the arguments to the Rust command line."""

import sys

from brainsurgery import _core


def main() -> None:
    """Run the command line and exit with its status."""
    try:
        status = _core.cli_main(sys.argv[1:])
    except KeyboardInterrupt:  # before the engine started; it reports interruptions itself
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
