"""Errors that reach the user.

Every problem with the user's input or files raises a `RetroPeftError` whose
message names the problem; the CLI prints it without a traceback and exits 2.
"""


class RetroPeftError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, mismatch)."""


class InputError(RetroPeftError):
    """A file, argument or record is missing or malformed."""


class IndexFormatError(RetroPeftError):
    """An index folder is missing, incomplete, corrupt or of an unknown format."""


class EncoderMismatchError(RetroPeftError):
    """An index is opened with an encoder other than the one that built it."""


class ModelNotFoundError(RetroPeftError):
    """A model name resolves to nothing installed or on disk."""



class AdapterMismatchError(InputError):
    """Weights trained or states computed for one model (an adapter, a frozen KV cache) meet another model."""
