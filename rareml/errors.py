"""The error a user can fix; entry points show it as one line (see rareml.cli.run)."""


class RareMLError(Exception):
    """A problem the user can fix (bad config, bad data, missing inputs): shown as one line."""
