"""Test hosts that are QEMU VMs running Debian 12's stock kernel (soft-dirty tracking, userfaultfd, full root),
for what this machine's kernel cannot do (pre-copy and post-copy migration). See /work/helpers/lab-api.md.
"""
