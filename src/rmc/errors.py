"""The one exception type users see: a one-line message naming the problem and the fix."""


class RMCError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with status 2."""
