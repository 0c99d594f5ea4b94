"""User-facing errors of the trainer and the exit code each one means, in one place.

Every error a user can fix is one of these classes; its message names the flag or file and
what to do. `flux_train_network.main` maps them to exit codes with `exit_code_for`; nothing
recognises an error by its class-name string. Stdlib only (tools and workers import it).

Exit codes of the trainer (the README lists them):
  0 finished; 1 training failed (a crash, or an error below with no better code);
  2 bad input: a flag, file, dataset or resume target, reported before the models load;
  4 the output folder is in use by another trainer; 5 disk full or read-only output;
  75 test hook FLUXTRAIN_EXIT_AFTER_STEP; 124 a hang guard fired; 130 interrupted (SIGINT);
  143 stopped by SIGTERM.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_FOLDER_IN_USE = 4
EXIT_DISK = 5
EXIT_TEST_CRASH = 75
EXIT_HANG = 124
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """An error the user can fix; printed as one line `error: <message>`, no traceback."""

    exit_code = EXIT_FAILED


class BadFlagError(UserError, ValueError):
    """A flag value or combination that cannot work; the message names the flag(s)."""

    exit_code = EXIT_BAD_INPUT


class BadFileError(UserError, ValueError):
    """An input file or folder that is missing, unreadable or of the wrong kind."""

    exit_code = EXIT_BAD_INPUT


class ResumeError(UserError, ValueError):
    """The resume target cannot be used by this run (not a state folder, settings differ, another run)."""

    exit_code = EXIT_BAD_INPUT


class FolderInUseError(UserError, RuntimeError):
    """Another trainer holds the output folder's lock."""

    exit_code = EXIT_FOLDER_IN_USE


class DiskError(UserError, OSError):
    """The disk filled up or became read-only while writing; the previous checkpoint is intact."""

    exit_code = EXIT_DISK


class HangError(UserError, TimeoutError):
    """A bounded wait ran out (see library.hang_guards); the process exits with EXIT_HANG."""

    exit_code = EXIT_HANG


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED
