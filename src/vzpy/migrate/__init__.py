"""Live migration: the transport (SSH, the JSON protocol, rsync, the page-server tunnel), the remote agent
and the preflight checks.

Errors here exit with vzmigrate's codes (OpenVZ vzctl's bin/vzmigrate.in, MIG_ERR_*). Conditions that
script has no code for take the code Virtuozzo's C vzmigrate gives them (its common.h: MIG_ERR_CONN_BROKEN,
MIG_ERR_CONN_TIMEOUT, MIG_ERR_PROTOCOL, MIG_ERR_DISKSPACE; it exits with the negated value).
"""

from __future__ import annotations

from vzpy.errors import VzError

# what `vzpy migrate -r no` renames the private area (and CTID.conf) to on the host the CT leaves
OLD_AREA_SUFFIX = ".migrated"


class MigrateError(VzError):
    """Any migration failure."""

    exit_code = 6


class MigrateUsage(MigrateError):
    exit_code = 1  # MIG_ERR_USAGE


class CtStopped(MigrateError):
    """A live migration of a CT that does not run."""

    exit_code = 2  # MIG_ERR_VPS_IS_STOPPED


class CantConnect(MigrateError):
    """The destination cannot be reached or does not let us in (any reason: network, host key, auth)."""

    exit_code = 4  # MIG_ERR_CANT_CONNECT


class Unreachable(CantConnect):
    pass


class HostKeyUnknown(CantConnect):
    pass


class HostKeyMismatch(CantConnect):
    pass


class AuthFailed(CantConnect):
    pass


class CopyFailed(MigrateError):
    """Data could not be copied to (or set up on) the destination: rsync, images, private area, tunnel."""

    exit_code = 6  # MIG_ERR_COPY


class RestoreFailed(MigrateError):
    exit_code = 7  # MIG_ERR_RESTORE_VPS (= MIG_ERR_START_VPS)


class CheckpointFailed(MigrateError):
    exit_code = 8  # MIG_ERR_CHECKPOINT (= MIG_ERR_STOP_SOURCE)


class CtExistsRemote(MigrateError):
    exit_code = 9  # MIG_ERR_EXISTS


class CtNotFound(MigrateError):
    exit_code = 10  # MIG_ERR_NOEXIST


class IpInUseRemote(MigrateError):
    exit_code = 12  # MIG_ERR_IP_IN_USE


class DestinationNotReady(MigrateError):
    """vzpy or a usable CRIU is missing on the destination (vzmigrate: "OpenVZ is not running", "vzrst
    module is not loaded on the destination node")."""

    exit_code = 14  # MIG_ERR_OVZ_NOT_RUNNING


class ApplyConfigFailed(MigrateError):
    exit_code = 15  # MIG_ERR_APPLY_CONFIG


class IncompatibleVersion(MigrateError):
    """The two vzpy speak incompatible protocol versions (vzmigrate: CPT version check failed)."""

    exit_code = 17  # MIG_ERR_UNSUP_CPT_VER


class UnsupportedCpu(MigrateError):
    exit_code = 18  # MIG_ERR_UNSUP_CPU


class RemoteConfigError(MigrateError):
    exit_code = 19  # MIG_ERR_CANT_READ_REMOTE_CONFIG


class MigrationLocked(MigrateError):
    exit_code = 20  # MIG_ERR_LOCKED


class ConnectionBroken(MigrateError):
    exit_code = 21  # Virtuozzo MIG_ERR_CONN_BROKEN


class ConnectionTimeout(MigrateError):
    exit_code = 22  # Virtuozzo MIG_ERR_CONN_TIMEOUT


class ProtocolError(MigrateError):
    exit_code = 26  # Virtuozzo MIG_ERR_PROTOCOL


class NoDiskSpaceRemote(MigrateError):
    exit_code = 31  # Virtuozzo MIG_ERR_DISKSPACE


# The class raised for an exit code in an agent's error reply (one per code; CantConnect's subclasses
# never come from an agent).
ERRORS_BY_CODE: dict[int, type[MigrateError]] = {
    cls.exit_code: cls
    for cls in (
        MigrateUsage,
        CtStopped,
        CantConnect,
        CopyFailed,
        RestoreFailed,
        CheckpointFailed,
        CtExistsRemote,
        CtNotFound,
        IpInUseRemote,
        DestinationNotReady,
        ApplyConfigFailed,
        IncompatibleVersion,
        UnsupportedCpu,
        RemoteConfigError,
        MigrationLocked,
        ConnectionBroken,
        ConnectionTimeout,
        ProtocolError,
        NoDiskSpaceRemote,
    )
}


def error_for_code(code: int, message: str, detail: str = "") -> VzError:
    """The error an agent reported, as the class of its exit code (a plain VzError with that code if none)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(message, detail=detail)
    error = MigrateError(message, detail=detail)
    error.exit_code = code
    return error
