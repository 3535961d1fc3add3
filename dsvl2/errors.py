"""dsvl2's exception types.

Every problem a user can cause (a bad file, a wrong key, a shape that does not fit, a limit that is
exceeded) raises a subclass of :class:`DSVL2Error` whose message names the file, key, shape or limit,
so nobody has to read a traceback from deep inside torch.

Exit codes of every ``dsvl2`` command (``dsvl2 --help`` states them): :data:`EXIT_USAGE` (2) for a
usage or input error (a bad flag, which argparse reports, or any :class:`DSVL2Error`),
:data:`EXIT_FAILURE` (1) for a runtime failure (anything else: out of memory, a disk error, a bug;
the traceback is printed), 130 on Ctrl-C.
"""

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
