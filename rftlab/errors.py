"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RftlabError(Exception):
    """A problem with the user's input or environment, phrased as what to do about it.

    The CLI prints ``error: <message>`` on one line and exits with status 2; no traceback.
    """
