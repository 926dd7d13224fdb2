"""Error types a user sees. Each carries a message that says what is wrong and what to do."""


class MedclError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class ConfigError(MedclError):
    pass


class ScanReadError(MedclError):
    """A scan could not be read or is unusable. `path` names the file; `reason` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LabelsError(MedclError):
    pass


class RunDirError(MedclError):
    pass


class CheckpointError(MedclError):
    pass


class TrainingDiverged(MedclError):
    pass
