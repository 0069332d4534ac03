// Command pool-engine-sim stands in for llama.cpp's llama-server in tests,
// demos and benchmarks: it checks and hashes a GGUF model file, serves
// /health, /v1/models, /metrics, POST /completion and a few /sim/
// endpoints, logs like llama-server and can be told to fail the ways real
// engines fail (see faults.go). With --engine vllm it stands in for vLLM
// instead: a model directory, an API server with an engine-core child
// process, vllm: metrics and sleep mode (see vllm.go).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The build number engines report; pools pin versions like b4567.
const buildNumber = 4567

type options struct {
	model        string
	host         string
	port         int
	loadTime     time.Duration
	listenAfter  time.Duration
	probeDevices []string
	fault        string
	faultAfter   time.Duration
	tokenTime    time.Duration
}

var logMu sync.Mutex

// logf writes one line to stderr, where llama-server logs.
func logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	if !strings.HasSuffix(line, "\n") {
		line += "\n"
	}
	logMu.Lock()
	defer logMu.Unlock()
	_, _ = os.Stderr.WriteString(line)
}

func main() {
	crashLikeC()
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if engineArg(args) == "vllm" {
		return runVLLM(args)
	}
	fs := flag.NewFlagSet("pool-engine-sim", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	var o options
	var probe string
	fs.StringVar(&o.model, "model", os.Getenv("LLAMA_ARG_MODEL"), "model `path` (GGUF)")
	fs.StringVar(&o.model, "m", os.Getenv("LLAMA_ARG_MODEL"), "shorthand for --model")
	fs.StringVar(&o.host, "host", envOr("LLAMA_ARG_HOST", "127.0.0.1"), "address to listen on")
	port := fs.String("port", os.Getenv("LLAMA_ARG_PORT"), "port to listen on (required; 0 picks one)")
	fs.DurationVar(&o.loadTime, "load-time", 0, "how long /health reports that the model is loading")
	fs.DurationVar(&o.listenAfter, "listen-after", 0, "load this long before listening at all, as vLLM's API server does")
	fs.StringVar(&probe, "probe-devices", "", "comma-separated device `paths` that /sim/devices opens O_RDWR")
	fs.StringVar(&o.fault, "fault", "", "fault `kind` to inject on its own: "+faultKindsHelp)
	fs.DurationVar(&o.faultAfter, "fault-after", 0, "delay between listening and --fault firing")
	fs.DurationVar(&o.tokenTime, "token-time", time.Millisecond, "time POST /completion takes to generate one token")
	fs.Bool("metrics", false, "accepted as llama-server's flag; /metrics is always served")
	version := fs.Bool("version", false, "print the version and exit")
	simChild := fs.Bool("sim-child", false, "internal: the leaked child of the fork-child fault")
	engineName := fs.String("engine", "llamacpp", "the engine to stand in for: llamacpp or vllm")

	known := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) { known[f.Name] = true })
	known["h"], known["help"] = true, true // the flag package's usage
	args, ignored := dropUnknownFlags(args, known, func(name string) bool {
		switch name {
		case "version", "sim-child", "metrics", "h", "help":
			return true
		}
		return false
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 1
	}
	if *simChild {
		// Outlives its parent on purpose, until someone kills it.
		for {
			time.Sleep(time.Hour)
		}
	}
	if *version {
		// llama-server prints its version to stderr.
		logf("version: %d (pool-engine-sim)", buildNumber)
		logf("built with go for %s", runtime.GOOS)
		return 0
	}
	if *engineName != "llamacpp" {
		logf("error: invalid --engine %q (want llamacpp or vllm)", *engineName)
		return 1
	}
	for _, a := range ignored {
		logf("sim: ignoring llama-server argument %s", a)
	}
	if fs.NArg() > 0 {
		logf("error: invalid argument: %s", fs.Arg(0))
		return 1
	}
	if o.model == "" {
		logf("error: --model is required")
		return 1
	}
	if *port == "" {
		logf("error: --port is required")
		return 1
	}
	p, err := strconv.Atoi(*port)
	if err != nil || p < 0 || p > 65535 {
		logf("error: invalid --port %q", *port)
		return 1
	}
	o.port = p
	if o.tokenTime < 0 {
		logf("error: invalid --token-time %v (want 0 or more)", o.tokenTime)
		return 1
	}
	for _, d := range strings.Split(probe, ",") {
		if d = strings.TrimSpace(d); d != "" {
			o.probeDevices = append(o.probeDevices, d)
		}
	}
	if o.fault != "" {
		if _, err := parseFault(o.fault); err != nil {
			logf("error: --fault: %v", err)
			return 1
		}
	}
	return serve(o)
}

// engineArg finds --engine's value before the flags are parsed, since
// each engine has its own flags.
func engineArg(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		name, v, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "engine" {
			continue
		}
		if hasValue {
			return v
		}
		if i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// dropUnknownFlags removes the llama-server arguments the simulator does not
// model (-ngl 99, --ctx-size 8192, --flash-attn, ...) so that real ExecStart=
// lines work unchanged. An unknown flag without "=" takes the next argument
// as its value unless that looks like a flag.
func dropUnknownFlags(args []string, known map[string]bool, isBool func(string) bool) (kept, dropped []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			kept = append(kept, args[i:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			kept = append(kept, a)
			continue
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if known[name] {
			kept = append(kept, a)
			if !hasValue && !isBool(name) && i+1 < len(args) {
				i++
				kept = append(kept, args[i])
			}
			continue
		}
		if !hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			a += " " + args[i]
		}
		dropped = append(dropped, a)
	}
	return kept, dropped
}

// checkModel does what gguf_init_from_file does first: open the file and
// compare the magic. It returns the GGUF version for the log line.
func checkModel(path string) (uint32, bool) {
	f, err := os.Open(path)
	if err != nil {
		logf("gguf_init_from_file: failed to open GGUF file '%s' (%s)", path, errText(err))
		logf("llama_model_load: error loading model: llama_model_loader: failed to load model from %s", path)
		logf("main: exiting due to model loading error")
		return 0, false
	}
	defer f.Close()
	var hdr [8]byte
	n, err := io.ReadFull(f, hdr[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		logf("gguf_init_from_file: failed to read magic from '%s' (%s)", path, errText(err))
		logf("llama_model_load: error loading model: llama_model_loader: failed to load model from %s", path)
		logf("main: exiting due to model loading error")
		return 0, false
	}
	if n < 4 || string(hdr[:4]) != "GGUF" {
		logf("gguf_init_from_file: invalid magic characters: '%s', expected 'GGUF'", printable(hdr[:min(n, 4)]))
		logf("llama_model_load: error loading model: llama_model_loader: failed to load model from %s", path)
		logf("main: exiting due to model loading error")
		return 0, false
	}
	if n < 8 {
		return 0, true
	}
	return binary.LittleEndian.Uint32(hdr[4:]), true
}

func printable(b []byte) string {
	out := make([]byte, len(b))
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			c = '.'
		}
		out[i] = c
	}
	return string(out)
}

// errText turns a Go error into the strerror text llama.cpp would print.
func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		s := errno.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	return err.Error()
}

// modelFault reads a "sim-fault=KIND" line from the model file.
func modelFault(path string) (fault, bool) {
	kind, ok := modelMarker(path, "sim-fault=")
	if !ok {
		return fault{}, false
	}
	f, err := parseFault(kind)
	return f, err == nil
}

// modelMarker finds a "<prefix>VALUE" line in the first 4 KiB of a model
// file: a test model can ask the simulator to misbehave or to load slowly,
// so one model of a pool does and another does not.
func modelMarker(path, prefix string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	b := make([]byte, 4096)
	n, _ := io.ReadFull(f, b)
	for _, line := range strings.Split(string(b[:n]), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func serve(o options) int {
	logf("build: %d (pool-engine-sim) with %s for %s/%s", buildNumber, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	logf("system info: n_threads = %d", runtime.NumCPU())
	ggufVersion, ok := checkModel(o.model)
	if !ok {
		return 1
	}

	// Listen before loading, as llama-server does, so that /health can say
	// "loading model" while the hash and --load-time run.
	time.Sleep(o.listenAfter)
	ln, err := net.Listen("tcp", net.JoinHostPort(o.host, strconv.Itoa(o.port)))
	if err != nil {
		logf("main: couldn't bind HTTP server socket, hostname: %s, port: %d (%v)", o.host, o.port, err)
		return 1
	}
	listenedAt := time.Now()
	port := ln.Addr().(*net.TCPAddr).Port
	logf("main: HTTP server is listening, hostname: %s, port: %d, http threads: %d", o.host, port, runtime.NumCPU())

	s := newServer(o)
	s.mu.Lock()
	s.listener = ln
	s.mu.Unlock()
	srv := s.httpServer()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !s.closed.Load() {
			logf("srv  start: http server error: %v", err)
			os.Exit(1)
		}
	}()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	if o.fault != "" {
		f, _ := parseFault(o.fault)
		delay := max(o.faultAfter, 0)
		time.AfterFunc(delay, func() { s.fire(f) })
	}

	go func() {
		logf("main: loading model")
		sum, err := hashFile(o.model)
		if err != nil {
			logf("llama_model_load: error loading model: %s", errText(err))
			logf("main: exiting due to model loading error")
			os.Exit(1)
		}
		versionText := fmt.Sprintf("GGUF V%d", ggufVersion)
		if ggufVersion == 3 {
			versionText += " (latest)"
		}
		logf("llama_model_loader: loaded meta data from %s (version %s)", o.model, versionText)
		loadTime := o.loadTime
		if d, ok := modelMarker(o.model, "sim-load-time="); ok {
			if extra, err := time.ParseDuration(d); err == nil {
				loadTime += extra
			}
		}
		if d := loadTime - time.Since(listenedAt); d > 0 {
			time.Sleep(d)
		}
		s.setLoaded(sum)
		logf("main: model loaded")
		if f, ok := modelFault(o.model); ok {
			logf("sim: model asks for fault %s", f)
			go s.fire(f)
		}
		url := fmt.Sprintf("http://%s", net.JoinHostPort(o.host, strconv.Itoa(port)))
		logf("main: server is listening on %s - starting the main loop", url)
		fmt.Fprintf(os.Stdout, "main: server is listening on %s - starting the main loop\n", url)
		logf("srv  update_slots: all slots are idle")
	}()

	<-sigs
	logf("srv    operator(): operator(): cleaning up before exit...")
	close(s.shutdown) // releases handlers blocked by hang-health
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
	}
	return 0
}
