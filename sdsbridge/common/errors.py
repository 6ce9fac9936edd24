"""The project's error types and the exit code each one ends a command with.

Exit codes (README, "Exit codes"): 0 done, 1 failed (the work itself failed: training diverged, an
export failed), 2 bad input (config, file, checkpoint), 3 the machine could not write (no space,
read-only, permission denied, I/O error), 130 interrupted (Ctrl-C / SIGTERM).
cli.py catches UserError (and its subclasses) and prints ``error: <message>`` on one line; programming
errors keep their tracebacks.
"""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error caused by user input. The message is one line that names the key/file and the problem;
    ``hints`` (optional) are short lines on what to do about it, printed under it."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str = "", hints: tuple[str, ...] = ()):
        super().__init__(message)
        self.hints = tuple(hints)


class RunFailed(UserError):
    """The input was fine but the work failed (e.g. training diverged); exit code 1."""

    exit_code = EXIT_FAILED


class WriteFailed(UserError):
    """The operating system refused a write (no space, read-only, permission, I/O error); exit code 3.
    The message names the path and the cause; no partial file is left under a final name."""

    exit_code = EXIT_WRITE_FAILED


class Interrupted(BaseException):
    """SIGINT / SIGTERM outside the training loop's own handling: the command abandons the file it is
    writing (atomic.py removes the temporary file) and exits 130. A BaseException, like
    KeyboardInterrupt, so no ``except Exception`` swallows it; not a KeyboardInterrupt, so click does not
    turn it into its own 'Aborted!'."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
