"""The project's user-facing error types. Each names the problem in its message; the CLI
prints that message as one line and exits non-zero."""


class SpecAttnError(ValueError):
    """Base class: bad input the user can fix."""


class CheckpointError(SpecAttnError):
    """A checkpoint is missing, corrupt, or not a supported Llama model."""


class IncompatibleModelsError(SpecAttnError):
    """Draft and verifier cannot work together (vocabulary or tokenizer mismatch)."""
