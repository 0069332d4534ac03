// Command demo walks through pool-managerd as an operator meets it: the
// .deb installed into a fresh systemd (the project's sandbox, with fake
// GPUs), two pools of the engine simulator, and the operator's tools.
// Every command is printed with its real output. Run it with make demo.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/llorch/pool-managerd/internal/testkit/sandbox"
)

const dest = "org.llorch.PoolManager1"

type demo struct {
	ctx context.Context
	s   *sandbox.Sandbox
}

// run prints a command and its output, as a shell session would.
func (d *demo) run(cmd string) string {
	fmt.Printf("\n$ %s\n", cmd)
	out, err := d.s.Command(d.ctx, "sh", "-c", cmd).CombinedOutput()
	fmt.Print(string(out))
	if err != nil {
		fmt.Printf("(exit status: %v)\n", err)
	}
	return strings.TrimSpace(string(out))
}

// quiet runs a command without showing it.
func (d *demo) quiet(cmd string) (string, error) {
	out, err := d.s.Command(d.ctx, "sh", "-c", cmd).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// waitFor polls a condition the operator would check by hand.
func (d *demo) waitFor(what, cmd, want string) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if out, err := d.quiet(cmd); err == nil && out == want {
			return
		}
		if time.Now().After(deadline) {
			fail(fmt.Errorf("timed out waiting for %s", what))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *demo) write(path, content string) {
	fmt.Printf("\n$ cat > %s <<EOF\n%sEOF\n", path, content)
	if _, err := d.quiet(fmt.Sprintf("mkdir -p %s && cat > %s <<'EOF'\n%sEOF", filepath.Dir(path), path, content)); err != nil {
		fail(err)
	}
}

func section(title string) { fmt.Printf("\n### %s\n", title) }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "demo:", err)
	panic(err)
}

func prop(pool, name string) string {
	return fmt.Sprintf("busctl get-property %s /org/llorch/PoolManager1/pool/%s org.llorch.PoolManager1.Pool %s", dest, pool, name)
}

func call(args string) string {
	return fmt.Sprintf("busctl --timeout=120 call %s /org/llorch/PoolManager1 org.llorch.PoolManager1.Manager %s", dest, args)
}

func main() {
	code := 0
	defer func() {
		if r := recover(); r != nil {
			code = 1
		}
		os.Exit(code)
	}()
	root, _ := os.Getwd()
	debs, _ := filepath.Glob(filepath.Join(root, "build", "pool-managerd_*.deb"))
	if len(debs) != 1 {
		fail(fmt.Errorf("no .deb in build/: run make packages first"))
	}
	env, binds, cleanup, err := sandbox.Build("github.com/llorch/pool-managerd/cmd/pool-engine-sim")()
	if cleanup != nil {
		defer cleanup()
	}
	if err != nil {
		fail(err)
	}
	sim := strings.TrimPrefix(env[0], sandbox.BinEnv("pool-engine-sim")+"=")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	fmt.Println("Booting a private systemd with a system bus and two fake GPUs (/dev/nvidia0, /dev/nvidia1)...")
	s, err := sandbox.Boot(ctx, sandbox.Options{Nodes: sandbox.FakeGPUs, Binds: append(binds, filepath.Dir(debs[0]))})
	if err != nil {
		fail(err)
	}
	defer func() {
		fmt.Println("\nTearing the sandbox down.")
		s.Close()
	}()
	d := &demo{ctx: ctx, s: s}

	section("Install the package")
	d.run("dpkg -i " + debs[0] + " 2>&1 | tail -n 3")
	d.run("systemctl is-active pool-managerd; getent group pool-engine")

	section("Configure two pools on the fake GPUs (llama-server stands in: pool-engine-sim)")
	d.write("/etc/pool-managerd/pool-managerd.conf.d/gpus.conf", `[Inventory]
Device=0 GPU-8f2c1a70-0000-4000-8000-000000000000 /dev/nvidia0
Device=1 GPU-8f2c1a70-0000-4000-8000-000000000001 /dev/nvidia1
ControlDevice=/dev/nvidiactl
`)
	d.quiet("printf 'GGUF\\003\\000\\000\\000 llama 3 8b q4' > /var/lib/pool-managerd/models/llama-3-8b-q4.gguf")
	d.quiet("printf 'GGUF\\003\\000\\000\\000 llama 3 8b q5' > /var/lib/pool-managerd/models/llama-3-8b-q5.gguf")
	d.quiet("printf 'GGUF\\003\\000\\000\\000 nomic embed' > /var/lib/pool-managerd/models/nomic-embed.gguf")
	d.quiet("printf 'PK\\003\\004 not a model' > /var/lib/pool-managerd/models/broken.gguf")
	d.write("/etc/pool-managerd/pools.d/llama8b.pool", fmt.Sprintf(`[Pool]
Description=Llama 3 8B on GPU 0
Devices=0
Model=llama-3-8b-q4.gguf
Slots=4
[Engine]
ExecStart=%s --model %%m --port %%p -ngl 99
Port=8081
StopTimeoutSec=5
[Health]
IntervalSec=2
[Scope]
MemoryMax=1G
`, sim))
	d.write("/etc/pool-managerd/pools.d/embed.pool", fmt.Sprintf(`[Pool]
Description=Embeddings on GPU 1
Devices=GPU-8f2c1a70-0000-4000-8000-000000000001
Model=nomic-embed.gguf
[Engine]
ExecStart=%s --model %%m --port %%p
Port=8082
`, sim))
	d.run("pool-managerd --check-config | sed -n '/^pool llama8b/,$p'")
	// The inventory is a manager setting: it takes a restart (pool files
	// alone would take a reload).
	d.run("systemctl restart pool-managerd")
	d.waitFor("the pools", "systemctl show -p StatusText --value pool-managerd", "2/2 pools ready")
	d.run("systemctl status pool-managerd --no-pager --lines=0")

	section("What poolctl shows")
	d.run("poolctl list")
	d.run("poolctl status llama8b")
	d.run("systemctl show -p Slice,DevicePolicy,DeviceAllow,MemoryMax pool-engine-llama8b.scope")
	// The engine's scope holds its shim and the engine, nothing else.
	d.run("systemd-cgls --no-pager -u pool-engine-llama8b.scope")
	d.run("curl -s localhost:8081/v1/models; echo")

	section("A router's lease, over busctl: held by the caller's connection, gone with it")
	// busctl's connection ends with the call, and the lease with it.
	d.run(call("AcquireLease s llama8b") + "; " + prop("llama8b", "ActiveLeases"))

	section("Drain, then start again")
	d.run("poolctl drain llama8b --deadline 30s")
	d.run("poolctl list")
	d.run("poolctl start llama8b")

	section("Reload to a new model, atomically")
	d.run("poolctl reload llama8b llama-3-8b-q5.gguf")
	d.run("poolctl reload llama8b broken.gguf; echo \"exit status $?\"")
	d.run("poolctl list")

	section("An engine crashes")
	d.quiet("systemd-run --unit=demo-events --property=RuntimeMaxSec=60 sh -c 'poolctl events > /run/demo-events.txt'")
	d.waitFor("poolctl events", "systemctl is-active demo-events.service", "active")
	time.Sleep(300 * time.Millisecond) // its subscription, before the crash
	d.run("kill -SEGV $(poolctl show llama8b -p MainPID --value)")
	d.waitFor("the restart", prop("llama8b", "RestartCount"), "u 1")
	d.waitFor("llama8b ready", prop("llama8b", "Ready"), "b true")
	d.quiet("systemctl stop demo-events.service")
	d.run("cat /run/demo-events.txt")
	d.run("journalctl -u pool-managerd -o verbose --no-pager MESSAGE_ID=b7d7597cfa114df0a87d0da1ee5155ee | grep -E '^ +(POOL_ID|CRASH_REASON|EXIT_SIGNAL|UPTIME_SEC|CRASH_COUNT|ENGINE_VERSION)='")
	d.run("poolctl list")
	d.run("poolctl allow-restart llama8b; echo \"exit status $?\"")

	section("Metrics through node_exporter")
	d.waitFor("the metrics file", "grep -c 'engine_crashes_total{pool_id=\"llama8b\",reason=\"signal\"} 1' /var/lib/prometheus/node-exporter/pool-managerd.prom", "1")
	if _, err := d.quiet("command -v prometheus-node-exporter"); err == nil {
		// The sandbox shares the host's network: a free port, not 9100.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail(err)
		}
		addr := l.Addr().String()
		l.Close()
		d.run("systemd-run --unit=node-exporter prometheus-node-exporter --collector.disable-defaults --collector.textfile --collector.textfile.directory=/var/lib/prometheus/node-exporter --web.listen-address=" + addr)
		d.waitFor("node_exporter", "curl -s -o /dev/null -w '%{http_code}' "+addr+"/metrics", "200")
		d.run("curl -s " + addr + "/metrics | grep -E '^(pool_managerd_(pool_ready|engine_crashes_total|drains_total|reload_success_total|reload_failure_total)|node_textfile_scrape_error)' | grep -v 'pool_managerd.* 0$'")
	} else {
		d.run("grep -E '^pool_managerd_(pool_ready|engine_crashes_total|drains_total|reload_success_total|reload_failure_total)' /var/lib/prometheus/node-exporter/pool-managerd.prom | grep -v ' 0$'")
	}

	section("Remove the package: pools drained, engines stopped")
	d.run("dpkg -r pool-managerd 2>&1 | tail -n 1; systemctl is-active pool-managerd pool-engine-llama8b.scope || true")
}
