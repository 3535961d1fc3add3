"""dsvl2's exception types.

Every problem a user can cause (a bad file, a wrong key, a shape that does not fit, a limit that is
exceeded) raises a subclass of :class:`DSVL2Error` whose message names the file, key, shape or limit,
so nobody has to read a traceback from deep inside torch.

Exit status of every ``dsvl2`` command (:data:`EXIT_HELP` is what ``dsvl2 --help`` prints):
:data:`EXIT_USAGE` (2) when the command line or its inputs are wrong (a bad flag, which argparse
reports, or any :class:`DSVL2Error`: fix the command); :data:`EXIT_FAILURE` (1) when a correct command
could not complete here (an optional extra not installed, out of memory, a disk error, a bug: the
traceback is printed); 130 on Ctrl-C. :func:`run_command` applies it.
"""

import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_HELP = ("exit status:\n"
             "  0    success\n"
             "  2    usage or input error: a bad flag, file or value (the message names it)\n"
             "  1    runtime failure: a missing optional extra, out of memory, a disk error, a bug (traceback shown)\n"
             "  130  interrupted (Ctrl-C)")


class DSVL2Error(Exception):
    """Base class of every error dsvl2 raises on purpose."""


class ConfigError(DSVL2Error, ValueError):
    """A config.json / processor_config.json / recipe value is missing, unknown or inconsistent."""


class CheckpointError(DSVL2Error, ValueError):
    """A weight file is missing, a key is missing or unexpected, or a tensor has the wrong shape."""


class InputError(DSVL2Error, ValueError):
    """Bad user input: unreadable image, wrong number of images, prompt over the context limit..."""


class TokenizerError(DSVL2Error, ValueError):
    """A tokenizer file is missing or lacks a special token the model needs."""


class ContextLengthError(InputError):
    """A conversation does not fit the model's context: the message names each image's token count."""


class UsageError(DSVL2Error, RuntimeError):
    """An object used in a way it does not support, e.g. reading the values of a quantized weight."""


def run_command(prog: str, main: Callable[[Any], int | None], args: Any) -> int:
    """``main(args)`` with the exit-status policy of the module docstring; errors go to stderr."""
    try:
        return int(main(args) or 0)
    except DSVL2Error as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001  (the policy: anything else is a runtime failure, shown in full)
        traceback.print_exc()
        print(f"{prog}: runtime failure (see the traceback above)", file=sys.stderr)
        return EXIT_FAILURE
