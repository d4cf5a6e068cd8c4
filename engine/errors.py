"""Errors a user can cause. The CLI prints them in one line, without a traceback."""


class AphroError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(AphroError):
    """A bad engine option or model config value."""


class CheckpointError(AphroError):
    """A checkpoint folder that cannot be loaded: missing, unexpected, misshaped or truncated.
    `report` is the engine.checkpoint.files.WeightReport when the tensors did not match the model."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class SpecError(AphroError):
    """A model spec that is wrong: names the file, the key and what was expected."""


class ModelNotSupportedError(AphroError):
    """No registered model for an HF architecture name."""


class ModelContractError(AphroError):
    """A model class that breaks the model contract (engine/models/contract.py): names the
    missing piece."""


class RequestError(AphroError, ValueError):
    """An invalid request: bad sampling values, a prompt longer than the context."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor whose shape differs from what the parameter (shard) needs."""

    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...], detail: str = "") -> None:
        self.expected, self.got = tuple(expected), tuple(got)
        super().__init__(f"expected shape {self.expected}, got {self.got}"
                         + (f" ({detail})" if detail else ""))


class RegistryFileError(AphroError):
    """The user registry file (engine.models.records) cannot be read or is not valid: the
    message names the file. In-tree models keep working without it."""


class UnvalidatedModelError(AphroError):
    """`--strict` and the architecture served has no passing, current validation record."""
