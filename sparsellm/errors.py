"""Errors a user can act on. Each maps to a documented exit code; the CLI prints one line that names
the problem and the fix."""


class SparseLLMError(Exception):
    exit_code = 1


class RecipeError(SparseLLMError):
    """Invalid recipe or command-line settings (including a device this machine does not have)."""

    exit_code = 2


class ModelLoadError(SparseLLMError):
    """The model cannot be found, read or loaded (missing, corrupt, offline, pickle refused)."""

    exit_code = 3


class UnsupportedArchitectureError(SparseLLMError):
    exit_code = 4


class DataError(SparseLLMError):
    """Calibration or evaluation data missing, unreadable or too short."""

    exit_code = 5


class OutputError(SparseLLMError):
    """The output folder (or the checkpoint) cannot be written (exists, not writable, disk full)."""

    exit_code = 6


class CompressionError(SparseLLMError):
    """A method cannot be applied to a layer (e.g. N:M with M not dividing the input width)."""

    exit_code = 7


class NumericalError(SparseLLMError):
    """NaN/inf in the calibration activations or statistics, or a Hessian that cannot be factored."""

    exit_code = 8


class CheckpointError(SparseLLMError):
    """A checkpoint folder that cannot be resumed: made by a different run, unreadable, or in the way."""

    exit_code = 9


class PublishError(SparseLLMError):
    """`sparsellm push` cannot upload: no token, not an output folder, invalid repo id, hub refused."""

    exit_code = 10


EXIT_INTERRUPTED = 130
