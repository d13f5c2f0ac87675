"""Errors that stop a training run for a reason the user must act on; the message says what happened and what
was kept. The CLI prints them without a traceback."""


class TrainingError(RuntimeError):
    pass


class BadSteps(TrainingError):
    """Too many steps in a row with a non-finite loss or gradient."""


class CheckpointWriteError(TrainingError, OSError):
    """A checkpoint could not be written (full disk, unwritable folder); the previous one is intact."""


class ResumeConflict(ValueError):
    """A command line that contradicts the run it would continue (another config, other `--init` weights, other
    training data), or a workdir that already holds a run."""
