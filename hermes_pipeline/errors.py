"""Errors a user can cause. The CLI prints each as one line and exits with code 2, without a traceback."""


class UserError(Exception):
    """A mistake in something the user gave us (a recipe, a path, an override); the message names the fix."""

    exit_code = 2


class RecipeError(UserError):
    """One or more problems in a recipe, each already formatted as one line: ``file: key.path: problem``."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class StageInterrupted(Exception):
    """A stage stopped early on purpose (a preemption signal) after saving what a re-run resumes from.

    Exit code 75 (EX_TEMPFAIL): the job should run again, not be reported as broken.
    """

    exit_code = 75
