"""vzpy: OpenVZ-style containers with checkpoint/restore and live migration on CRIU."""

__version__ = "0.1.0"
