"""The `siglip2-jax` commands, one module each, and what they share: argparse types, the multi-host flags,
and `run_command`, the one place where a failure becomes an exit status and a line on stderr.

A command module has
    register(subparsers)        adds its subparser: flags, --help, epilog
    run(args) -> int            the command; its exit status
and may have
    subject(args)               what it works on (its OUT, its MODEL): named in an error that does not name it
    interrupted(args, error)    the line to print on Ctrl-C (what was kept, how to continue)
    ALSO_REFUSED                exception classes reported in one line besides ValueError and OSError

Its top level imports no jax, flax, grain or orbax (`run` imports them when it starts), so that
`siglip2-jax --help` and `siglip2-jax COMMAND --help` answer at once (`tests/test_cli.py` checks it).

`run_command(name, args)` runs a command and maps what it raises:

    exit  stderr
    1     error: MESSAGE            TrainingDiverged (the loss became NaN or infinite)
    2     error: MESSAGE            CommandError, or one of the project's errors (ConfigError, WeightsError,
                                    SourceError, EmbedError, ImageError, DataError): their messages name the culprit
    2     error: SUBJECT: MESSAGE   any other ValueError or OSError (and ALSO_REFUSED); SUBJECT only where the
                                    message does not name it already; MESSAGE is its first line
    130   interrupted...            KeyboardInterrupt: the command's `interrupted` line, or "interrupted"
anything else propagates (a traceback: a bug, not bad input).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import first_line

# in the order `siglip2-jax --help` lists them
COMMANDS = ("convert", "export", "classify", "embed", "search", "finetune", "serve")

DIVERGED = "siglip2_jax.train.run", "TrainingDiverged"  # (module, class): not imported here, it imports jax


class CommandError(Exception):
    """A command's own refusal (arguments that do not fit together, a missing extra): `error: MESSAGE`, exit 2."""


def command_module(name: str):
    """The module of command `name` (one of COMMANDS)."""
    return importlib.import_module(f"{__name__}.{name}")


def run_command(name: str, args: argparse.Namespace) -> int:
    """Runs command `name` on its parsed `args`; returns its exit status, or the one that what it raised maps
    to (see the module docstring), after printing the one line that says why."""
    command = command_module(name)
    try:
        return command.run(args)
    except KeyboardInterrupt as error:
        interrupted = getattr(command, "interrupted", None)
        print(interrupted(args, error) if interrupted else "interrupted", file=sys.stderr)
        return 130
    except CommandError as error:
        return _error(str(error))
    except Exception as error:
        if _is_diverged(error):
            return _error(str(error), status=1)
        if _is_project_error(error):
            return _error(first_line(error))
        if isinstance(error, (ValueError, OSError, *getattr(command, "ALSO_REFUSED", ()))):
            subject = command.subject(args) if hasattr(command, "subject") else None
            message = first_line(error)
            return _error(f"{subject}: {message}" if subject and str(subject) not in message else message)
        raise


def _is_diverged(error: BaseException) -> bool:
    module, name = DIVERGED
    return module in sys.modules and isinstance(error, getattr(sys.modules[module], name))


def _is_project_error(error: BaseException) -> bool:
    """Whether `error`'s class is one of this package's own ValueErrors (ConfigError, WeightsError,
    SourceError, EmbedError, ImageError, DataError, ...): their messages name the culprit. Told by the module
    that defines the class, so that none is imported here (--help must stay light) and a class may move."""
    package = __name__.split(".")[0]
    return isinstance(error, ValueError) and type(error).__module__.split(".")[0] == package


def _error(message: str, status: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


# ---- shared by the commands' flags ---------------------------------------------------------------------
def int_at_least(minimum: int):
    """An argparse `type` for whole numbers >= minimum; anything else is a one-line usage error
    (a 0 or negative count is never quietly replaced by a default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)


def add_multi_host_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator-address, --num-processes, --process-id: for `distributed.initialize`."""
    group = parser.add_argument_group("multi-host (one process per host; all flags default to the environment)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="address of process 0, the same on every host ($JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int_at_least(1), metavar="N", help="number of processes ($JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int_at_least(0), metavar="I", help="this process, 0..N-1 ($JAX_PROCESS_ID)")
