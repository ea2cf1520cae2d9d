"""Facts about this host that several commands need (CPU, mounts), and the one policy for each."""
