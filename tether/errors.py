"""Errors that describe a user's mistake. The CLI prints them as one line, without a traceback."""


class TetherError(Exception):
    """Bad input or configuration: the message names the field, file or row and the fix."""


class ConfigError(TetherError):
    pass


class DataError(TetherError):
    pass


class RewardError(TetherError):
    pass
