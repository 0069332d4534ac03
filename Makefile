# pool-managerd. `make test` is the one test command (CI runs exactly it).
GO      ?= go
GOFLAGS ?=
export GOFLAGS
# go-nvml's header trips deprecation warnings in every uncached cgo build.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

VERSION ?= 0.1.0
GOARCH  ?= $(shell $(GO) env GOARCH)
export VERSION GOARCH

.PHONY: all build man packages deb rpm test fmt-check vet unit demo bench soak fuzz fuzz-short vm-test gpu-check clean deps-test deps-demo deps-vm

all: build

build:
	$(GO) build -ldflags "-X github.com/llorch/pool-managerd/internal/metrics.Version=$(VERSION)" -o build/ ./cmd/...

MANPAGES := build/man/poolctl.1.gz build/man/pool-managerd.8.gz build/man/pool-managerd.conf.5.gz build/man/pool-managerd.pool.5.gz
man: $(MANPAGES)
build/man/%.gz: packaging/man/%.md
	@mkdir -p build/man
	$(GO) tool go-md2man -in $< | gzip -9n > $@

packages: deb rpm
deb: build man
	$(GO) tool nfpm package -f nfpm.yaml -p deb -t build/
rpm: build man
	$(GO) tool nfpm package -f nfpm.yaml -p rpm -t build/

test: deps-test fmt-check vet unit fuzz-short

# What each target takes from Debian, installed first when missing (root;
# otherwise it says what to install): the tests run their own systemd, bus,
# promtool and node_exporter, never the packages' services.
DEPS := internal/tools/deps/debian.sh
SYSTEMD_DEPS := systemd:systemd dbus-daemon:dbus busctl:systemd
deps-test:
	@$(DEPS) $(SYSTEMD_DEPS) promtool:prometheus prometheus-node-exporter:prometheus-node-exporter nft:nftables
deps-demo:
	@$(DEPS) $(SYSTEMD_DEPS)
deps-vm:
	@$(DEPS) qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap mkfs.ext4:e2fsprogs ssh:openssh-client

fmt-check:
	@out=$$(gofmt -l cmd internal docs); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 -timeout 300s ./...

# The operator's walkthrough: the .deb installed into a private systemd
# (root needed), two simulator pools on fake GPUs, busctl, journalctl.
demo: deps-demo packages
	$(GO) run ./internal/tools/demo

# The operator's walkthrough on a real Debian 12 host: the .deb, then the
# .rpm, in a qemu guest (systemd as PID 1, cgroup v2), with a reboot and a
# removal (root needed; internal/tools/vmtest/run.sh says what it needs installed).
vm-test: deps-vm packages
	GO=$(GO) internal/tools/vmtest/run.sh

# Figures against systemd and the bus, each in interleaved rounds (ours,
# reference, ours, ...) in the sandbox (root needed); writes
# build/bench.json with every round. BENCH_ARGS picks figures and settings:
# crash restart lease drain reload staging ready scale storm ondemand, rounds=N
# (default 5), stage-mb=N (default 2048), idle-sec=N (default 10), load=N,
# profile=DIR (with GOFLAGS=-tags=pprof: the daemon's trace and profiles).
# Two tables: quiet, then load=2 (two CPU-bound processes in the engines'
# slice for every round, as a host's engines would keep its CPUs busy);
# a load= in BENCH_ARGS runs that one table only.
bench:
ifeq ($(findstring load=,$(BENCH_ARGS)),)
	$(GO) run ./internal/tools/bench $(BENCH_ARGS)
	$(GO) run ./internal/tools/bench $(BENCH_ARGS) load=2
else
	$(GO) run ./internal/tools/bench $(BENCH_ARGS)
endif

# 1000 engine faults across four pools with drains and reloads, then the
# leak checks (root needed; bounded by 8 minutes). SOAK_ARGS=load=N runs N
# CPU-bound processes in the engines' slice for the whole soak (as the
# bench's load=N); the report says which load it ran under.
soak:
	$(GO) run ./internal/tools/soak $(SOAK_ARGS)

# Fuzzes every target for FUZZTIME. make test runs each for a fixed number
# of executions: a wall-clock -fuzztime can fail with "context deadline
# exceeded" and no crasher (golang/go#75804, fixed in Go 1.27), and a count
# has no deadline to race. Seed corpora also run as plain tests.
FUZZTIME ?= 60s
FUZZMINTIME ?= 10s
fuzz:
	$(GO) test ./internal/config -run '^$$' -fuzz FuzzParsePool -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/config -run '^$$' -fuzz FuzzParseManager -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/bus -run '^$$' -fuzz FuzzPathAndArguments -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./dbus -run '^$$' -fuzz FuzzPathCodec -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/shim -run '^$$' -fuzz FuzzReadMessage -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/safetext -run '^$$' -fuzz FuzzBound -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/safetext -run '^$$' -fuzz FuzzLine -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/sockdiag -run '^$$' -fuzz FuzzParseMessages -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/lifecycle -run '^$$' -fuzz FuzzStepMovesOnlyAlongTheTables -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/health -run '^$$' -fuzz FuzzHealthAnswer -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)
	$(GO) test ./internal/health -run '^$$' -fuzz FuzzMetricsAnswer -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME)

fuzz-short:
	$(MAKE) fuzz FUZZTIME=20000x FUZZMINTIME=500x

# On a host with a real NVIDIA GPU (root), bounded at 7 minutes: the NVML
# inventory, nvidia-smi, an XID watch, GPU 0's free memory, and the daemon
# with Backend=nvml in a private systemd: a simulator pool on GPU 0, its
# memory fit and a start held by a CUDA process of no pool, then a real
# CUDA engine (python3 + libcuda.so.1) in the pool's scope; exits 2 at once
# without a GPU. Uses build/ binaries when present, else builds into its
# own temp directory.
gpu-check:
	internal/tools/gpucheck/gpu-check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build
