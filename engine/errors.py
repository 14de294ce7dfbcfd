"""The one exception type the engine raises for bad input.

Its message is a single line that names the problem and the fix; the CLI and the app show it
as is, never with a traceback.
"""


class ParleyError(Exception):
    """Bad input from a user: a file, a setting or a model that cannot be used as given."""
