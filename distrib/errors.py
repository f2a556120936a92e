"""The errors distrib speaks in: each is one line for the user, naming what is wrong and how to fix it.

The bottom of the package: every layer raises these, none has to import a higher one to do so.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key and the fix (exit 2)."""


class TrainingError(RuntimeError):
    """A run that cannot go on, said in one line (the CLI prints it and exits 1).

    Every rank raises it together, and rank 0 speaks; ``from_this_rank`` marks what only the raising
    rank knows (which rank did not arrive at a collective), so that it speaks too.
    """

    def __init__(self, msg: str, from_this_rank: bool = False):
        super().__init__(msg)
        self.from_this_rank = from_this_rank
