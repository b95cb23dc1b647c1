"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class MmfusionError(Exception):
    """Base class: a problem the user can fix (bad config, bad data, missing file)."""


class ConfigError(MmfusionError):
    """The experiment config or an override is invalid."""


class DataError(MmfusionError):
    """The dataset cannot be read, or too many of its records are undecodable."""


class DecodeError(DataError):
    """One field of one record cannot be decoded (bad bytes, empty audio, non-UTF-8 text, ...)."""

    def __init__(self, modality: str, reason: str) -> None:
        super().__init__(f"{modality}: {reason}")
        self.modality = modality
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:  # picklable across Ray workers
        return (DecodeError, (self.modality, self.reason))


class ArtifactError(MmfusionError):
    """An artifact folder is missing a file or does not match the code."""


class TrainingDivergedError(MmfusionError):
    """The training loss became NaN or infinite; the message names the epoch and the step."""
