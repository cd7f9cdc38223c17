"""Errors that describe a user's mistake. The CLI prints them as one line, without a traceback."""


class TetherError(Exception):
    """Bad input or configuration: the message names the field, file or row and the fix.

    The message is always one line: text quoted from elsewhere (a user's exception, a parser's
    complaint) is folded onto it.
    """

    def __init__(self, message: object = ""):
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


class ConfigError(TetherError):
    pass


class DataError(TetherError):
    pass


class RewardError(TetherError):
    pass
