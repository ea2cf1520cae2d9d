"""Typed errors. Each carries the exit code vzctl uses for the same condition (docs/exit-codes.md)."""

from __future__ import annotations


class VzError(Exception):
    """An error shown to the operator as one line; `exit_code` follows vzctl's vzerror.h."""

    exit_code = 3  # VZ_SYSTEM_ERROR

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        # Extra lines shown below the message (e.g. CRIU log excerpts); the first line stays the summary.
        self.detail = detail


class SystemFailure(VzError):
    """The host cannot do it: a program or privilege vzpy needs is missing, or a system call failed."""

    exit_code = 3  # VZ_SYSTEM_ERROR


class CommandFailed(VzError):
    """An external program failed (the subprocess helper raises this)."""

    exit_code = 3


class ExecFailed(VzError):
    exit_code = 8  # VZ_COMMAND_EXECUTION_ERROR


class Locked(VzError):
    exit_code = 9  # VZ_LOCKED


class GlobalConfigNotFound(VzError):
    exit_code = 10  # VZ_NOCONFIG


class ConfigNotFound(VzError):
    exit_code = 14  # VZ_NOVE_CONFIG


class ChkpntError(VzError):
    exit_code = 16  # VZCTL_E_CHKPNT


class RestoreError(VzError):
    exit_code = 17  # VZ_RESTORE_ERROR


class InvalidSyntax(VzError):
    exit_code = 20  # VZ_INVALID_PARAMETER_SYNTAX


class InvalidValue(VzError):
    exit_code = 21  # VZ_INVALID_PARAMETER_VALUE


class BadConfig(VzError):
    exit_code = 85  # VZ_INVALID_CONFIG


class NotRunning(VzError):
    exit_code = 31  # VZ_VE_NOT_RUNNING


class AlreadyRunning(VzError):
    exit_code = 32  # VZ_VE_RUNNING


class StopFailed(VzError):
    exit_code = 33  # VZ_STOP_ERROR


class PrivateNotFound(VzError):
    exit_code = 43  # VZ_FS_NOPRVT


class PrivateExists(VzError):
    exit_code = 44  # VZ_FS_PRVT_AREA_EXIST


class NoDiskSpace(VzError):
    exit_code = 46  # VZ_FS_NO_DISK_SPACE


class BadTemplate(VzError):
    exit_code = 47  # VZ_FS_BAD_TMPL


class MountFailed(VzError):
    exit_code = 50  # VZ_FS_CANTMOUNT


class DestroyFailed(VzError):
    exit_code = 52  # VZ_FS_DEL_PRVT


class BadIp(VzError):
    exit_code = 71  # VZ_BADIP


class IpInUse(VzError):
    exit_code = 78  # VZ_IP_INUSE


class StartDisabled(VzError):
    exit_code = 105  # VZ_VE_START_DISABLED: DISABLED=yes in the CT's config


class TemplateNotFound(VzError):
    exit_code = 91  # VZ_PKGSET_NOT_FOUND


class NetworkError(VzError):
    exit_code = 130  # VZ_VETH_ERROR (vzctl's include/vzerror.h)


class CtFileError(VzError):
    """A file inside a CT's root that vzpy could not reach or write without leaving the root."""

    exit_code = 8  # VZ_COMMAND_EXECUTION_ERROR: the setting could not be applied inside the CT

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # the OSError's, when one caused it


class MigrationInDoubt(VzError):
    """An unfinished migration may have left the CT running on the destination: this copy must not run."""

    exit_code = 9  # VZ_LOCKED: the CT is held by an operation (the migration) until it is recovered


class WrongStage(VzError):
    """A staged chkpnt/restore step given out of order."""

    exit_code = 16


class CriuUnavailable(VzError):
    """No usable CRIU (missing, too old for this kernel, or failing `criu check`)."""

    exit_code = 5  # VZ_BAD_KERNEL: the host cannot checkpoint
