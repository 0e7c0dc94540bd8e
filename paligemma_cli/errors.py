"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PaliGemmaError(Exception):
    """A problem the user can fix: bad input, a missing checkpoint, an option out of range.

    The message is one line that says what is wrong and what to do next.
    """


class ReportedElsewhere(PaliGemmaError):
    """A failure that another process reports (rank 0 of a `torchrun` job): this one exits non-zero
    without a message of its own, so the job prints each error once."""
