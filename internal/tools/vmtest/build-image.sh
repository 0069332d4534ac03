#!/bin/sh
# Builds (or finds in the cache) an image that make vm-test boots:
# debootstrap of SUITE into a directory, the guest's boot hook, then
# mkfs.ext4 -d into a raw disk. Cached under build/vm/image-SUITE-KEY, KEY
# being a hash of this script and of the guest files baked into the image;
# rebuilt only when one of them changes. Prints the cache directory on
# stdout. The Debian mirror is the one this machine's apt uses for bookworm
# (the same archive serves sid; VM_MIRROR overrides).
#
#   build-image.sh [bookworm|sid]
#
# bookworm: Debian 12, the host the packages are for (.deb and .rpm).
# sid: a newer systemd and kernel, and Debian's own llama-server.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../../.." && pwd)
cache=${VM_CACHE:-$top/build/vm}
suite=${1:-bookworm}

# What every guest needs: systemd as PID 1, the bus, the kernel (and its
# initramfs), the .deb's dependencies (nfpm.yaml: systemd, dbus), curl for
# the engines' HTTP endpoints, procps for ps/pgrep.
packages=systemd-sysv,dbus,udev,linux-image-cloud-amd64,curl,procps
case $suite in
# initramfs-tools: bookworm's kernel asks for an initramfs generator; rpm
# for the .rpm boot. podman and what it strictly needs (no recommends:
# no uidmap, slirp4netns or fuse-overlayfs) for the engine in a container;
# debootstrap does not resolve virtual packages, so the runtime (crun) and
# the network stack (netavark) are named. openssh-server for poolctl -H
# from the host (started by the check that needs it).
bookworm) packages=$packages,initramfs-tools,rpm,podman,crun,conmon,netavark,golang-github-containers-common,golang-github-containers-image,openssh-server ;;
# sid's kernel pulls dracut. llama.cpp-tools is the real engine,
# llama.cpp-services Debian's own unit for it (the baseline of the
# restart figure), python3-gguf and numpy write its tiny models in the
# guest.
sid) packages=$packages,llama.cpp-tools,llama.cpp-services,python3-gguf,python3-numpy ;;
*)
	echo "vm image: unknown suite $suite (bookworm or sid)" >&2
	exit 2
	;;
esac

key=$(cat "$here/build-image.sh" "$here/guest/vm-check.service" "$here/guest/boot.sh" | sha256sum | cut -c1-16)
out=$cache/image-$suite-$key
if [ -f "$out/disk.img" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
	echo "vm image: cached $out" >&2
	echo "$out"
	exit 0
fi

# mirror: the first deb source of bookworm itself (not -updates, -security) in
# apt's configuration, deb822 .sources or one-line .list.
mirror() {
	if [ -n "${VM_MIRROR:-}" ]; then
		echo "$VM_MIRROR"
		return
	fi
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v suite=bookworm '
			function flush() {
				if (!done && enabled != "no" && types ~ "(^| )deb( |$)" && suites ~ ("(^| )" suite "( |$)") && uri != "") {
					print uri; done = 1
				}
				types = ""; suites = ""; uri = ""; enabled = ""
			}
			/^[ \t]*#/ { next }
			/^[ \t]*$/ { flush(); next }
			{ k = tolower($1); v = $0; sub(/^[^:]*:[ \t]*/, "", v) }
			k == "types:" { types = v }
			k == "suites:" { suites = v }
			k == "uris:" { split(v, u, /[ \t]+/); uri = u[1] }
			k == "enabled:" { enabled = tolower(v) }
			END { flush() }' "$f"
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		# deb [options] URI SUITE COMPONENTS...
		sed -e 's/\[[^]]*\]//' "$f" | awk -v suite=bookworm '$1 == "deb" && $3 == suite { print $2 }'
	done
}
url=$(mirror | head -n 1)
if [ -z "$url" ]; then
	echo "vm image: no deb source for bookworm in /etc/apt/sources.list{,.d} (set VM_MIRROR)" >&2
	exit 1
fi

for tool in debootstrap mkfs.ext4; do
	command -v "$tool" >/dev/null || { echo "vm image: $tool missing (apt-get install debootstrap e2fsprogs)" >&2; exit 1; }
done

mkdir -p "$cache"
tmp=$cache/image-$suite-$key.tmp
root=$tmp/root
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

echo "vm image: debootstrap $suite from apt's mirror (no cached image $key)" >&2
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$url" >"$tmp/debootstrap.log" 2>&1 || {
	tail -n 30 "$tmp/debootstrap.log" >&2
	exit 1
}

# The console stays quiet and usable: no getty hanging up ttyS0, no first
# boot prompt, no timers that wake up apt, fsck or podman during a check.
for unit in serial-getty@ttyS0.service getty@tty1.service systemd-firstboot.service \
	apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
	podman-auto-update.timer podman-auto-update.service podman-restart.service; do
	ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# sshd only where a check starts it (its host keys were made at install).
rm -f "$root/etc/systemd/system/multi-user.target.wants/ssh.service" "$root/etc/systemd/system/sshd.service"
echo "/dev/vda / ext4 defaults 0 1" >"$root/etc/fstab"
echo vmtest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmtest\n' >"$root/etc/hosts"
mkdir -p "$root/var/log/journal"
install -m 0755 "$here/guest/boot.sh" "$root/usr/local/sbin/vm-check-boot"
install -m 0644 "$here/guest/vm-check.service" "$root/etc/systemd/system/vm-check.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../vm-check.service "$root/etc/systemd/system/multi-user.target.wants/vm-check.service"
rm -f "$root"/var/cache/apt/archives/*.deb

kernel=$(ls "$root"/boot/vmlinuz-* | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | tail -n 1)
cp "$kernel" "$tmp/vmlinuz"
cp "$initrd" "$tmp/initrd.img"
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$tmp/packages.txt"
truncate -s 3G "$tmp/disk.img"
mkfs.ext4 -q -F -L vmroot -d "$root" "$tmp/disk.img"
rm -rf "$root"

# One image a suite: older keys go.
for old in "$cache"/image-"$suite"-*; do
	[ "$old" = "$tmp" ] || rm -rf "$old"
done
mv "$tmp" "$out"
trap - EXIT
echo "vm image: built $out in $(($(date +%s) - start)) s ($(basename "$kernel"))" >&2
echo "$out"
