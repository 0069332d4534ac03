#!/bin/sh
# Installs from Debian what a make target needs, before it runs: each
# argument is COMMAND:PACKAGE, and apt runs only for commands that are
# missing, so a machine that has them all needs no network. The packages'
# own services (prometheus on :9090, node_exporter on :9100) are not
# wanted: invoke-rc.d asks policy-rc.d before it starts one. Not root, or
# no apt: says what to install and leaves it to the tests to fail with
# their own message.
#
#   internal/tools/deps/debian.sh promtool:prometheus ...
set -eu
missing=
for need in "$@"; do
	cmd=${need%%:*} pkg=${need#*:}
	command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] ||
		[ -x "/lib/systemd/$cmd" ] || missing="$missing $pkg"
done
[ -n "$missing" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "deps: missing Debian packages:$missing (as root: apt-get install --no-install-recommends$missing)" >&2
	exit 0
fi
echo "deps: installing from Debian:$missing"
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -q
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
if [ -d /run/systemd/system ]; then
	systemctl disable --now prometheus.service prometheus-node-exporter.service 2>/dev/null || true
fi
