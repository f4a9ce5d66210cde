"""The error a user can fix; entry points show it as one line (see rareml.cli.run)."""


class RareMLError(Exception):
    """A problem the user can fix (bad config, bad data, missing inputs): shown as one line."""


class InputError(RareMLError, ValueError):
    """A record that does not fit the model's schema; `field` names the culprit, `reason` is a
    short machine-readable kind (counted by the API's rejected-inputs metric)."""

    def __init__(self, message: str, reason: str, field: str | None = None):
        super().__init__(message)
        self.reason, self.field = reason, field
