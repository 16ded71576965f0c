"""User-facing errors and the CLI wrapper that turns them into one clear line.

A mistake of the user's (a bad flag, a missing file, a malformed prompt) raises `UserError`. Scripts run
their `main` through `run_cli`, which prints `error: <message>` on stderr and exits with code 2, or for a
bug of ours prints `internal error: ...` and exits with 1. The traceback is shown only with `--debug`.
`--verbose` keeps the INFO logs of the libraries (paddlenlp, ppdiffusers) that scripts otherwise silence.
"""

import os
import sys
import traceback
import warnings


class UserError(Exception):
    """An input problem the user can fix; the message names the input, the problem and the fix."""


EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


# Warnings Paddle prints on every import that say nothing about the user's run.
IMPORT_NOISE = ("No ccache found", "Setuptools is replacing distutils")


def run_cli(main, argv=None):
    """Run `main(argv)` and map exceptions to exit codes. `--debug` (or OPENSORA_DEBUG=1) re-raises;
    `--verbose` sets OPENSORA_VERBOSE=1, which `utils.runtime.quiet_library_logs` reads."""
    for message in IMPORT_NOISE:
        warnings.filterwarnings("ignore", message=message)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OPENSORA_DEBUG") == "1"
    if "--verbose" in argv:
        os.environ["OPENSORA_VERBOSE"] = "1"
    argv = [arg for arg in argv if arg not in ("--debug", "--verbose")]
    try:
        main(argv)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            raise
        print(f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(EXIT_INTERNAL_ERROR)
