#!/bin/sh
# make gpu-check: pool-managerd on this host's real NVIDIA GPU, in at most
# 7 minutes (about one and a half where all goes well): the NVML inventory,
# nvidia-smi's view, an XID watch, GPU 0's free memory, and the daemon with
# Backend=nvml in a private systemd (the project's sandbox) running a pool
# on GPU 0: its scope's DeviceAllow; the memory fit against GPU 0's real
# free memory and a start held by a CUDA process of no pool, which the pool
# waits out; and a real CUDA engine (python3 and the driver's libcuda.so.1)
# in the pool's scope.
# Safe as root on a machine that is not ours: it writes only in its own
# temporary directory, and removes it and the sandbox on exit, failure and
# signals. Binaries come from build/ when there (make build), else go build.
# Arguments go to the program: -holder 'CMD' runs CMD (compute work on GPU
# 0) and checks that NVML and /proc see it hold the GPU and let it go.
# Exit status: 0 passed, 1 a check failed, 2 no GPU or not root.
set -eu
cd "$(dirname "$0")/../../.."

no_gpu() {
	echo "gpu-check: no NVIDIA GPU: $1" >&2
	exit 2
}

has_nvml() {
	for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64; do
		[ -e "$d/libnvidia-ml.so.1" ] && return 0
	done
	for l in ldconfig /sbin/ldconfig /usr/sbin/ldconfig; do
		if command -v "$l" >/dev/null 2>&1; then
			"$l" -p 2>/dev/null | grep -q 'libnvidia-ml\.so\.1' && return 0
			return 1
		fi
	done
	return 1
}

command -v nvidia-smi >/dev/null 2>&1 && has_nvml || no_gpu "nvidia-smi/libnvidia-ml not found"
# nvidia-smi answers within seconds or the driver is wedged.
if ! out=$(timeout 15 nvidia-smi -L 2>&1) || ! printf '%s\n' "$out" | grep -q '^GPU 0:'; then
	no_gpu "nvidia-smi lists none: $(printf '%s\n' "$out" | head -n 1)"
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "gpu-check: needs root: it boots a private systemd in a namespace" >&2
	exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
cleanup() {
	# Only what a killed run leaves: the sandbox's empty cgroups.
	if [ -f "$tmp/sandbox-tag" ]; then
		tag=$(cat "$tmp/sandbox-tag")
		case $tag in
		pool-managerd-test-*)
			for d in /sys/fs/cgroup/"$tag" /sys/fs/cgroup/*/"$tag"; do
				[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
			done
			;;
		esac
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chmod 755 "$tmp"
mkdir -m 755 "$tmp/bin"

for b in pool-managerd pool-managerd-shim pool-engine-sim; do
	if [ -x "build/$b" ]; then
		cp "build/$b" "$tmp/bin/"
	else
		go build -o "$tmp/bin/$b" "./cmd/$b"
	fi
done
if [ -x build/gpu-check ]; then
	cp build/gpu-check "$tmp/bin/"
else
	go build -o "$tmp/bin/gpu-check" ./internal/tools/gpucheck
fi

# A host without systemd (a GPU machine's container image) gets it from a
# layer made by internal/tools/gpucheck/layer.sh: the libraries it lacks go in
# too, and the users dbus runs as are added to copies of its user files.
if [ ! -x /lib/systemd/systemd ] && [ -n "${GPU_CHECK_LAYER:-}" ]; then
	L=$tmp/layer
	mkdir -m 755 "$L"
	tar -C "$L" -xzf "$GPU_CHECK_LAYER"
	libdir=/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo "$(uname -m)-linux-gnu")
	mkdir -p "$L$libdir"
	for l in "$L"/libs/*; do
		n=$(basename "$l")
		ldconfig -p | grep -q "^[[:space:]]$n " || mv "$l" "$L$libdir/"
	done
	rm -rf "$L/libs"
	mkdir -p "$L/etc"
	for f in passwd group shadow gshadow; do [ ! -e "/etc/$f" ] || cp -p "/etc/$f" "$L/etc/"; done
	getent group messagebus >/dev/null || groupadd -P "$L" --system messagebus
	getent passwd messagebus >/dev/null || useradd -P "$L" --system -g messagebus --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin messagebus
	getent group systemd-journal >/dev/null || groupadd -P "$L" --system systemd-journal
	export POOL_SANDBOX_LAYER=$L
	echo "gpu-check: systemd from the layer $GPU_CHECK_LAYER; libraries added: $(ls "$L$libdir" | tr '\n' ' ')"
fi

# The sandbox's own scratch directory goes in $tmp too. The program bounds
# its part in the sandbox at 300 s; this is above it and the host's part.
limit=420
rc=0
TMPDIR=$tmp timeout -k 5 $limit "$tmp/bin/gpu-check" -work "$tmp" -bin "$tmp/bin" "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
	echo "gpu-check: did not finish within $limit s" >&2
fi
exit "$rc"
