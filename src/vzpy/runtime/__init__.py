"""What runs a CT: namespaces and its init (launcher), cgroups, and its network."""
