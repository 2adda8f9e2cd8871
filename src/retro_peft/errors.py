"""Errors that reach the user.

Every problem with the user's input or files raises a `RetroPeftError` whose
message names the problem; the CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


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



class MissingPackageError(RetroPeftError):
    """An optional package a command needs is not installed; the message is the pip command that installs it."""

    @classmethod
    def of(cls, error: ModuleNotFoundError, needed_by: str = "this") -> MissingPackageError | None:
        """The one-line error for a missing optional package (its import name in `error`); None for any other."""
        package = (error.name or "").partition(".")[0]
        extra = OPTIONAL_PACKAGES.get(package)
        if extra is None:
            return None
        return cls(f"{needed_by} needs the optional package {package!r}, which is not installed: "
                   f"pip install 'retro-peft[{extra}]'")


# Import name -> the extra of pyproject.toml's [project.optional-dependencies] that installs it.
OPTIONAL_PACKAGES = {
    **dict.fromkeys(("fastapi", "uvicorn", "httptools", "pydantic", "pydantic_settings", "limits", "jwt",
                     "prometheus_client", "redis", "yaml"), "serve"),
    "qdrant_client": "qdrant",
    "bitsandbytes": "quantize",
    "opentelemetry": "otel",
}


class AdapterMismatchError(InputError):
    """Weights trained or states computed for one model (an adapter, a frozen KV cache) meet another model."""
