"""dsvl2's exception types.

Every problem a user can cause (a bad file, a wrong key, a shape that does not fit, a limit that is
exceeded) raises a subclass of :class:`DSVL2Error` whose message names the file, key, shape or limit,
so nobody has to read a traceback from deep inside torch.
"""


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
