"""The CRIU boundary: the only package in vzpy that talks to CRIU or imports pycriu.

require_criu() finds a usable criu (CriuUnavailable otherwise); Criu(binary) runs dump, pre-dump, restore
and page-server through CRIU's RPC with CriuOptions; detect_capabilities() and report() say what this host
can do and derive_plan() which migration path follows from it.
"""

from vzpy.criu.binary import CriuBinary, CriuVersion, find_binary, require_criu
from vzpy.criu.features import (
    CapabilityReport,
    FeatureRow,
    HostCapabilities,
    MigrationPlan,
    derive_plan,
    detect_capabilities,
    report,
)
from vzpy.criu.options import CgroupMode, CriuAction, CriuOptions, NetworkLock
from vzpy.criu.rpc import Criu, FdCallback, NotifyCallback, PageServer, first_error, log_excerpt

__all__ = [
    "CapabilityReport",
    "CgroupMode",
    "Criu",
    "CriuAction",
    "CriuBinary",
    "CriuOptions",
    "CriuVersion",
    "FdCallback",
    "FeatureRow",
    "HostCapabilities",
    "MigrationPlan",
    "NetworkLock",
    "NotifyCallback",
    "PageServer",
    "derive_plan",
    "detect_capabilities",
    "find_binary",
    "first_error",
    "log_excerpt",
    "report",
    "require_criu",
]
