#!/usr/bin/env bash
# What makes vzpy part of the host (called by scripts/setup.sh, idempotent, as root): the boot service
# (packaging/vzpy.service: enabled where systemd runs, never started here), the man page and the bash
# completion, both generated from the installed command line so they never drift from it, and logrotate's
# entry for the operation log. DESTDIR=/some/dir installs under that directory instead (for tests).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VZPY_VENV:-/opt/vzpy/venv}
DESTDIR=${DESTDIR:-}
VZPY=${VZPY_BIN:-$VENV/bin/vzpy}

unit_dir=$DESTDIR/etc/systemd/system
man_dir=$DESTDIR/usr/local/share/man/man8
completion_dir=$DESTDIR/usr/local/share/bash-completion/completions
logrotate_dir=$DESTDIR/etc/logrotate.d

install -d "$unit_dir" "$man_dir" "$completion_dir" "$logrotate_dir"
install -m 0644 packaging/vzpy.service "$unit_dir/vzpy.service"
install -m 0644 packaging/vzpy.logrotate "$logrotate_dir/vzpy"

# generated into temporary files first: a failing generator must not leave an empty page or script behind
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m vzpy.manpage "$tmp"
install -m 0644 "$tmp/vzpy.8" "$man_dir/vzpy.8"
_VZPY_COMPLETE=bash_source "$VZPY" >"$tmp/vzpy.bash"
grep -q 'complete .*vzpy' "$tmp/vzpy.bash" || { echo "vzpy setup: no bash completion from $VZPY" >&2; exit 1; }
install -m 0644 "$tmp/vzpy.bash" "$completion_dir/vzpy"

if [ -z "$DESTDIR" ]; then
  command -v mandb >/dev/null && mandb -q 2>/dev/null || true
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable vzpy.service
    echo "vzpy setup: vzpy.service enabled (starts ONBOOT CTs at boot; checkpoints running CTs at shutdown)"
  else
    echo "vzpy setup: systemd is not running here; $unit_dir/vzpy.service installed, enable it with" \
      "\`systemctl enable vzpy.service\` once it runs"
  fi
fi
echo "vzpy setup: man page $man_dir/vzpy.8, bash completion $completion_dir/vzpy"
