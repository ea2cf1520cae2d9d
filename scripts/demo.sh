#!/usr/bin/env bash
# `make demo`: a CT's life on this host, in a vzpy root of its own (/var/lib/vzpy-demo).
set -euo pipefail
DEMO=/var/lib/vzpy-demo
CTID=101
IP=10.88.0.101
export VZPY_CONF=$DEMO/vz.conf

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

mkdir -p "$DEMO"
cat >"$VZPY_CONF" <<CONF
VE_ROOT="$DEMO/root/\$VEID"
VE_PRIVATE="$DEMO/private/\$VEID"
CONFDIR="$DEMO/conf"
DUMPDIR="$DEMO/dump"
TEMPLATE="$DEMO/template"
LOCKDIR="$DEMO/lock"
CGROUP_PARENT="vzpy-demo"
CONF
if vzpy status "$CTID" | grep -q ' exist '; then   # a previous demo's CT
  vzpy -q stop --fast "$CTID" 2>/dev/null || true
  vzpy -q destroy "$CTID"
fi

step "What this host can do"
run vzpy check

step "Create CT $CTID from the built-in 'minimal' template"
run vzpy create "$CTID" --ostemplate minimal --hostname demo.vzpy --ipadd "$IP"
# a service from the CT's own files: the CT's init starts everything in /etc/vzpy/services
mkdir -p "$DEMO/private/$CTID/var/www"
echo "hello from CT $CTID" >"$DEMO/private/$CTID/var/www/index.html"
printf '#!/bin/sh\nexec httpd -f -p 80 -h /var/www\n' >"$DEMO/private/$CTID/etc/vzpy/services/httpd"
chmod +x "$DEMO/private/$CTID/etc/vzpy/services/httpd"
# a counter that lives in a shell's memory: after restore it must go on, not start again at 1
cat >"$DEMO/private/$CTID/etc/vzpy/services/counter" <<'SVC'
#!/bin/sh
i=0
while :; do i=$((i + 1)); echo "$i" >/var/www/counter; sleep 0.1; done
SVC
chmod +x "$DEMO/private/$CTID/etc/vzpy/services/counter"

step "Start it and look inside"
run vzpy start "$CTID"
run vzpy exec "$CTID" hostname
run vzpy exec "$CTID" ps
run vzpy list
run vzpy list --json

step "The host reaches the CT's service on $IP"
for _ in $(seq 50); do
  if out=$(wget -qO- -T 1 "http://$IP/" 2>/dev/null); then break; fi
  sleep 0.1
done
printf '$ wget -qO- http://%s/\n%s\n' "$IP" "$out"
[ "$out" = "hello from CT $CTID" ]

step "Checkpoint the running CT to a dump file (it stops), then restore it"
sleep 1
before=$(wget -qO- "http://$IP/counter")
printf 'counter before chkpnt: %s\n' "$before"
run vzpy chkpnt "$CTID" --dumpfile "$DEMO/dump/Dump.$CTID"
run vzpy status "$CTID"
run vzpy dumpinfo "$DEMO/dump/Dump.$CTID"
run vzpy restore "$CTID" --dumpfile "$DEMO/dump/Dump.$CTID"
after=$(wget -qO- "http://$IP/counter")
printf 'counter after restore: %s (it went on from %s: the memory came back)\n' "$after" "$before"
[ "$after" -ge "$before" ]

step "A live snapshot for cron: --suspend --dump --resume"
run vzpy chkpnt "$CTID" --snapshot --with-fs --dumpfile "$DEMO/dump/Snap.$CTID"
run vzpy status "$CTID"

step "Stop and destroy"
run vzpy stop "$CTID"
run vzpy status "$CTID"
run vzpy destroy "$CTID"

step "Online migration between two local test hosts (namespaces with their own sshd and /vz), and back"
"$(dirname "$0")/demo_migrate.py"
printf '\nDemo done.\n'
