"""vzpy's lab: the machinery its tests, `make demo` and bench build around vzpy, never imported by vzpy.

- `vzpy_lab.netns`: test hosts as namespaces of this machine (own netns, mount ns, /etc/vz, /vz, sshd)
  on a bridged test network with a client namespace.
"""
