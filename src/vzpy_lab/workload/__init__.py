"""The state-fidelity workload for checkpoint/restore tests: a static C program plus its Python clients."""
