"""The trainer's user errors."""


class TrainingError(Exception):
    """A user error found before or during training: printed as one line, exit status 2."""
