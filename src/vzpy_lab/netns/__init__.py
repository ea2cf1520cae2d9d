"""Test hosts as namespaces of this machine, for multi-host tests (live migration), the demo and bench.

    with TestNetwork.create() as network:          # a switch netns with a bridge, a client netns
        a, b = network.add_host("a"), network.add_host("b")
        a.run(["vzpy", "list"])                       # in a's net, mount and UTS namespaces
        network.client_run(network.ssh_argv(b, "hostname"))

Modules by role: network.py (the switch and the client), host.py (a host and its sshd), launcher.py (the
stdlib-only process that enters a host's namespaces and becomes its sshd), keys.py (ssh keys),
reaper.py (finding and killing what belongs to a host; reaping networks of killed runs), system.py
(small system helpers), layout.py (addresses, names, paths, time limits and errors).
"""

from vzpy_lab.netns.host import TestHost
from vzpy_lab.netns.keys import ClientKey
from vzpy_lab.netns.layout import HostCleanupError, HostSetupError
from vzpy_lab.netns.network import TestNetwork
from vzpy_lab.netns.reaper import reap_stale

__all__ = ["ClientKey", "HostCleanupError", "HostSetupError", "TestHost", "TestNetwork", "reap_stale"]
