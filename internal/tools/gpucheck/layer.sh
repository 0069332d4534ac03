#!/bin/sh
# internal/tools/gpucheck/layer.sh OUT.tar.gz: this Debian host's systemd and
# dbus as a layer for make gpu-check on a GPU machine whose image has
# neither (GPU_CHECK_LAYER=OUT.tar.gz). Paths are put under /usr, as a
# merged-/usr host has them; the libraries they link go in libs/, from
# which gpu-check.sh takes those the host lacks.
set -eu
out=$(realpath "$1")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
L=$tmp/layer
mkdir -p "$L/libs"
dpkg -L systemd libsystemd-shared dbus dbus-bin dbus-daemon dbus-system-bus-common libdbus-1-3 | sort -u |
	while read -r f; do
		case $f in /lib/* | /bin/* | /sbin/*) d=/usr$f ;; *) d=$f ;; esac
		# Empty directories count: dbus reads /etc/dbus-1/system.d.
		if [ -d "$f" ] && [ ! -L "$f" ]; then
			mkdir -p "$L$d"
			continue
		fi
		[ -f "$f" ] || [ -L "$f" ] || continue
		mkdir -p "$L$(dirname "$d")"
		cp -a "$f" "$L$d"
	done
find "$L/usr" -type f | while read -r f; do
	file -L "$f" | grep -q ELF || continue
	ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
	case $path in */systemd/*) continue ;; esac
	cp -L "$path" "$L/libs/$name"
done
tar -C "$L" -czf "$out" .
echo "layer.sh: $(du -h "$out" | cut -f1) in $out ($(ls "$L/libs" | wc -l) libraries)"
