"""Errors a user can act on. Each maps to a documented exit code; the CLI prints one line."""


class SparseLLMError(Exception):
    exit_code = 1


class RecipeError(SparseLLMError):
    """Invalid recipe or command-line settings."""

    exit_code = 2


class ModelLoadError(SparseLLMError):
    exit_code = 3


class UnsupportedArchitectureError(SparseLLMError):
    exit_code = 4


class DataError(SparseLLMError):
    """Calibration or evaluation data missing, unreadable or too short."""

    exit_code = 5


class OutputError(SparseLLMError):
    """The output folder cannot be written (exists, not writable, disk full)."""

    exit_code = 6


class CompressionError(SparseLLMError):
    """A method cannot be applied to a layer (e.g. N:M with M not dividing the input width)."""

    exit_code = 7


EXIT_INTERRUPTED = 130
