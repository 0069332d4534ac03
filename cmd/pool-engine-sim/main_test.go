package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var simBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pool-engine-sim-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	simBin = filepath.Join(dir, "pool-engine-sim")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	build := exec.CommandContext(ctx, "go", "build", "-o", simBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	err = build.Run()
	cancel()
	code := 1
	if err != nil {
		fmt.Fprintln(os.Stderr, "building pool-engine-sim:", err)
	} else {
		code = m.Run()
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// outBuf collects one output stream of the simulator as it arrives.
type outBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
	eof chan struct{}
}

func (b *outBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *outBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// readInto copies r into a buffer until EOF. The pipe is ours rather than
// exec's so that cmd.Wait does not wait on readers.
func readInto(r *os.File) *outBuf {
	b := &outBuf{eof: make(chan struct{})}
	go func() {
		defer close(b.eof)
		defer r.Close()
		_, _ = io.Copy(b, r)
	}()
	return b
}

type sim struct {
	t      *testing.T
	cmd    *exec.Cmd
	port   int
	stdout *outBuf
	stderr *outBuf
	done   chan struct{}
	state  *os.ProcessState
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	require.NoError(t, ln.Close())
	return port
}

func writeModel(t *testing.T, content []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tiny-q4.gguf")
	require.NoError(t, os.WriteFile(p, content, 0o644))
	return p
}

func ggufModel(t *testing.T) (string, []byte) {
	t.Helper()
	content := []byte("GGUF")
	content = binary.LittleEndian.AppendUint32(content, 3)
	for i := range 100000 {
		content = append(content, byte(i*31))
	}
	return writeModel(t, content), content
}

// startSim starts the simulator on a free port and kills it in cleanup.
func startSim(t *testing.T, model string, extra ...string) *sim {
	t.Helper()
	port := freePort(t)
	args := append([]string{"--model", model, "--host", "127.0.0.1", "--port", strconv.Itoa(port)}, extra...)
	s := &sim{t: t, port: port, done: make(chan struct{})}
	s.cmd = exec.Command(simBin, args...)
	s.cmd.Dir = t.TempDir() // any core dump lands here
	outR, outW, err := os.Pipe()
	require.NoError(t, err)
	errR, errW, err := os.Pipe()
	require.NoError(t, err)
	s.cmd.Stdout, s.cmd.Stderr = outW, errW
	err = s.cmd.Start()
	_ = outW.Close()
	_ = errW.Close()
	if err != nil {
		_ = outR.Close()
		_ = errR.Close()
		require.NoError(t, err)
	}
	s.stdout, s.stderr = readInto(outR), readInto(errR)
	go func() {
		_ = s.cmd.Wait()
		s.state = s.cmd.ProcessState
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			_ = s.cmd.Process.Kill()
			select {
			case <-s.done:
			case <-time.After(10 * time.Second):
				t.Errorf("pid %d did not die after SIGKILL", s.cmd.Process.Pid)
			}
		}
		if t.Failed() {
			t.Logf("simulator stderr:\n%s", s.stderr.String())
		}
	})
	return s
}

func (s *sim) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", s.port, path)
}

// waitListening waits until the port accepts connections.
func (s *sim) waitListening() {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", s.port), time.Second)
		if err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-s.done:
			s.t.Fatalf("simulator exited before listening: %v\n%s", s.state, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("port %d not listening: %v", s.port, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitHealthy polls /health until 200.
func (s *sim) waitHealthy() {
	s.t.Helper()
	s.waitListening()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _ := s.get("/health", time.Second)
		if code == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("/health never became 200 (last %d)", code)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitLog waits for a line matching re on stderr and returns its submatches.
func (s *sim) waitLog(re string) []string {
	s.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(10 * time.Second)
	for {
		if m := rx.FindStringSubmatch(s.stderr.String()); m != nil {
			return m
		}
		select {
		case <-deadline:
			s.t.Fatalf("no stderr line matching %q in:\n%s", re, s.stderr.String())
		case <-s.stderr.eof:
			if m := rx.FindStringSubmatch(s.stderr.String()); m != nil {
				return m
			}
			s.t.Fatalf("stderr closed without a line matching %q:\n%s", re, s.stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (s *sim) wait() syscall.WaitStatus {
	s.t.Helper()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		s.t.Fatalf("simulator did not exit")
	}
	return s.state.Sys().(syscall.WaitStatus)
}

func (s *sim) alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

func client(timeout time.Duration) *http.Client {
	// No keep-alive: some requests end the process that served them.
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
}

func (s *sim) get(path string, timeout time.Duration) (int, []byte) {
	s.t.Helper()
	resp, err := client(timeout).Get(s.url(path))
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, body
}

func (s *sim) postFault(kind string) {
	s.t.Helper()
	resp, err := client(5*time.Second).Post(s.url("/sim/fault?kind="+kind), "", nil)
	require.NoError(s.t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(s.t, err, "the fault must fire only after the response is out")
	require.Equal(s.t, http.StatusAccepted, resp.StatusCode, string(body))
	assert.JSONEq(s.t, fmt.Sprintf(`{"fault":%q}`, kind), string(body))
}

func runSim(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, simBin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

func TestVersion(t *testing.T) {
	t.Parallel()
	code, stdout, stderr := runSim(t, "--version")
	assert.Equal(t, 0, code)
	assert.Contains(t, stdout+stderr, "version: 4567 (pool-engine-sim)\n")
	assert.Contains(t, stdout+stderr, "built with go for linux\n")
}

func TestBadMagic(t *testing.T) {
	t.Parallel()
	model := writeModel(t, []byte("AB\x00\x01 not a model"))
	code, _, stderr := runSim(t, "--model", model, "--port", strconv.Itoa(freePort(t)))
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "gguf_init_from_file: invalid magic characters: 'AB..', expected 'GGUF'\n")
	assert.Contains(t, stderr, "llama_model_load: error loading model: ")
}

func TestMissingModel(t *testing.T) {
	t.Parallel()
	model := filepath.Join(t.TempDir(), "absent.gguf")
	code, _, stderr := runSim(t, "--model", model, "--port", strconv.Itoa(freePort(t)))
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "failed to open GGUF file '"+model+"' (No such file or directory)")
}

func TestRequiredFlags(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	code, _, stderr := runSim(t, "--model", model)
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "--port is required")
	code, _, stderr = runSim(t, "--port", "1")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "--model is required")
	code, _, stderr = runSim(t, "--model", model, "--port", "1", "--fault", "bogus")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "unknown fault kind")
}

func TestHealthLoading(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--load-time", "300ms")
	started := time.Now()
	s.waitListening()

	resp, err := client(2 * time.Second).Get(s.url("/health"))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	assert.JSONEq(t, `{"status":"loading model"}`, string(body))

	s.waitHealthy()
	assert.GreaterOrEqual(t, time.Since(started), 300*time.Millisecond)
	code, body := s.get("/health", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	assert.JSONEq(t, `{"status":"ok"}`, string(body))

	s.waitLog(`main: model loaded`)
	// A request's line is written once its answer is out.
	s.waitLog(`srv  log_server_r: request: GET /health 127.0.0.1 200\n`)
	stderr := s.stderr.String()
	assert.Contains(t, stderr, "build: 4567 (pool-engine-sim)")
	assert.Contains(t, stderr, "llama_model_loader: loaded meta data from "+model+" (version GGUF V3 (latest))")
	assert.Contains(t, stderr, "srv  log_server_r: request: GET /health 127.0.0.1 503\n")
	assert.Contains(t, stderr, "srv  log_server_r: request: GET /health 127.0.0.1 200\n")
	assert.Less(t, strings.Index(stderr, "GET /health 127.0.0.1 503"), strings.Index(stderr, "main: model loaded"))
	// stdout is its own pipe: its line may be read a moment after stderr's.
	want := fmt.Sprintf("main: server is listening on http://127.0.0.1:%d - starting the main loop", s.port)
	assert.Eventually(t, func() bool { return strings.Contains(s.stdout.String(), want) }, 10*time.Second, 10*time.Millisecond,
		"stdout %q lacks %q", s.stdout.String(), want)
}

func TestModels(t *testing.T) {
	t.Parallel()
	model, content := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	code, body := s.get("/v1/models", 2*time.Second)
	require.Equal(t, http.StatusOK, code, string(body))
	sum := sha256.Sum256(content)
	var got struct {
		Object string `json:"object"`
		Data   []struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			OwnedBy string `json:"owned_by"`
			Meta    struct {
				SHA256 string `json:"sha256"`
				Path   string `json:"path"`
			} `json:"meta"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(body, &got))
	assert.Equal(t, "list", got.Object)
	require.Len(t, got.Data, 1)
	assert.Equal(t, "tiny-q4.gguf", got.Data[0].ID)
	assert.Equal(t, "model", got.Data[0].Object)
	assert.Equal(t, "llamacpp", got.Data[0].OwnedBy)
	assert.Equal(t, hex.EncodeToString(sum[:]), got.Data[0].Meta.SHA256)
	assert.Equal(t, model, got.Data[0].Meta.Path)
	s.waitLog(`srv  log_server_r: request: GET /v1/models 127\.0\.0\.1 200`)
}

func TestLlamaArgumentsIgnored(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "-ngl", "99", "--ctx-size=8192", "--flash-attn", "--seed", "-1")
	s.waitHealthy()
	s.waitLog(`ignoring llama-server argument -ngl 99`)
}

func TestDevices(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	missing := filepath.Join(t.TempDir(), "nvidia9")
	dir := t.TempDir()
	s := startSim(t, model, "--probe-devices", "/dev/null,"+missing+","+dir)
	s.waitListening()
	code, body := s.get("/sim/devices", 2*time.Second)
	require.Equal(t, http.StatusOK, code)
	var got map[string]string
	require.NoError(t, json.Unmarshal(body, &got))
	assert.Equal(t, map[string]string{"/dev/null": "ok", missing: "ENOENT", dir: "EISDIR"}, got)
}

func TestFaultEndpointErrors(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitListening()

	resp, err := client(2*time.Second).Post(s.url("/sim/fault?kind=bogus"), "", nil)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Contains(t, string(body), "unknown fault kind")

	for _, kind := range []string{"exit:256", "exit:x"} {
		resp, err = client(2*time.Second).Post(s.url("/sim/fault?kind="+kind), "", nil)
		require.NoError(t, err)
		_ = resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, kind)
	}

	code, _ := s.get("/sim/fault?kind=segv", 2*time.Second)
	assert.Equal(t, http.StatusMethodNotAllowed, code)
	assert.True(t, s.alive())
}

func TestFaultsKill(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		kind   string
		signal syscall.Signal // 0: exits with code
		code   int
		stderr string
	}{
		{kind: "segv", signal: syscall.SIGSEGV},
		{kind: "abort", signal: syscall.SIGABRT, stderr: "GGML_ASSERT("},
		{kind: "cuda", signal: syscall.SIGABRT, stderr: "CUDA error: an illegal memory access was encountered\n" +
			"  current device: 0, in function ggml_backend_cuda_synchronize at /app/ggml/src/ggml-cuda/ggml-cuda.cu:2503\n" +
			"  cudaStreamSynchronize(cuda_ctx->stream())\n" +
			"/app/ggml/src/ggml-cuda/ggml-cuda.cu:75: CUDA error\n"},
		{kind: "exit:3", code: 3},
		{kind: "exit:0", code: 0},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			t.Parallel()
			model, _ := ggufModel(t)
			s := startSim(t, model)
			s.waitHealthy()
			s.postFault(tc.kind)
			ws := s.wait()
			if tc.signal != 0 {
				require.True(t, ws.Signaled(), "want death by %v, got %v", tc.signal, ws)
				assert.Equal(t, tc.signal, ws.Signal())
			} else {
				require.True(t, ws.Exited(), "got %v", ws)
				assert.Equal(t, tc.code, ws.ExitStatus())
			}
			<-s.stderr.eof
			assert.Contains(t, s.stderr.String(), tc.stderr)
			assert.NotContains(t, s.stderr.String(), "goroutine ", "no Go panic")
		})
	}
}

func TestFaultFlag(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--fault", "exit:7", "--fault-after", "100ms")
	ws := s.wait()
	require.True(t, ws.Exited(), "got %v", ws)
	assert.Equal(t, 7, ws.ExitStatus())

	s = startSim(t, model, "--fault", "segv")
	ws = s.wait()
	require.True(t, ws.Signaled(), "got %v", ws)
	assert.Equal(t, syscall.SIGSEGV, ws.Signal())
}

func TestFaultIgnoreTerm(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("ignore-term")
	s.waitLog(`ignoring SIGTERM`)
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
	// Still serving after the signal had time to land.
	time.Sleep(200 * time.Millisecond)
	code, _ := s.get("/health", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	require.True(t, s.alive())
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGKILL))
	ws := s.wait()
	require.True(t, ws.Signaled(), "got %v", ws)
	assert.Equal(t, syscall.SIGKILL, ws.Signal())
}

func procState(pid int) (byte, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// pid (comm) S ...; comm may hold spaces, so cut at the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, fmt.Errorf("bad stat %q", b)
	}
	return b[i+2], nil
}

func TestFaultForkChild(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("fork-child")
	m := s.waitLog(`child (\d+) started`)
	child, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	t.Cleanup(func() { _ = syscall.Kill(child, syscall.SIGKILL) })

	pgid, err := syscall.Getpgid(child)
	require.NoError(t, err)
	assert.Equal(t, child, pgid, "child runs in its own session")

	require.NoError(t, s.cmd.Process.Kill())
	s.wait()
	select {
	case <-s.stderr.eof: // the child does not hold the log pipe
	case <-time.After(5 * time.Second):
		t.Error("stderr still open after the parent died")
	}
	state, err := procState(child)
	require.NoError(t, err, "child must outlive its parent")
	assert.NotEqual(t, byte('Z'), state)
}

func TestFaultHangHealth(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("hang-health")

	_, err := client(300 * time.Millisecond).Get(s.url("/health"))
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout(), "%v", err)

	code, _ := s.get("/v1/models", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)

	// A hanging health check must not hold up shutdown.
	hung := make(chan error, 1)
	go func() {
		resp, err := client(10 * time.Second).Get(s.url("/health"))
		if err == nil {
			_ = resp.Body.Close()
		}
		hung <- err
	}()
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
	ws := s.wait()
	require.True(t, ws.Exited(), "got %v", ws)
	assert.Equal(t, 0, ws.ExitStatus())
	select {
	case err := <-hung:
		assert.Error(t, err, "/health must not answer even at shutdown")
	case <-time.After(5 * time.Second):
		t.Error("hung /health request outlived the process")
	}
}

// long-line:N writes one line of N bytes; log:TEXT logs TEXT as
// llama-server --verbose logs a request's body, on one line; both leave
// the engine running.
func TestFaultLongLineAndRequestLog(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("long-line:100000")
	long := func() bool {
		for l := range strings.SplitSeq(s.stderr.String(), "\n") {
			if len(l) == 100000 && strings.Trim(l, "abcdefghijklmnopqrstuvwxyz") == "" {
				return true
			}
		}
		return false
	}
	require.Eventually(t, long, 10*time.Second, 10*time.Millisecond, "one line of 100000 bytes")

	prompt := `{"prompt":"CUDA error: out of memory\nsecond line"}`
	resp, err := client(5*time.Second).Post(s.url("/sim/fault?kind="+url.QueryEscape("log:"+prompt)), "", nil)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	s.waitLog(`\nsrv  log_server_r: request:  \{"prompt":"CUDA error: out of memory\\nsecond line"\}\n`)
	assert.True(t, s.alive())

	for _, bad := range []string{"long-line:0", "long-line:x", "long-line:2000000000"} {
		resp, err := client(2*time.Second).Post(s.url("/sim/fault?kind="+bad), "", nil)
		require.NoError(t, err)
		_ = resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, bad)
	}
}

func vmRSS(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return 0, errors.New("no VmRSS")
}

func TestFaultOOM(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("oom")
	s.waitLog(`oom: 64 MiB allocated`)
	rss, err := vmRSS(s.cmd.Process.Pid)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, rss, 64<<10, "pages are touched, RSS grows")
	require.NoError(t, s.cmd.Process.Kill())
	ws := s.wait()
	require.True(t, ws.Signaled(), "got %v", ws)
	assert.Equal(t, syscall.SIGKILL, ws.Signal())
}

func TestSignalsExitCleanly(t *testing.T) {
	t.Parallel()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			t.Parallel()
			model, _ := ggufModel(t)
			s := startSim(t, model)
			s.waitHealthy()
			require.NoError(t, s.cmd.Process.Signal(sig))
			ws := s.wait()
			require.True(t, ws.Exited(), "got %v", ws)
			assert.Equal(t, 0, ws.ExitStatus())
			<-s.stderr.eof
			assert.Contains(t, s.stderr.String(), "srv    operator(): operator(): cleaning up before exit...\n")
		})
	}
}

func TestDropUnknownFlags(t *testing.T) {
	known := map[string]bool{"model": true, "port": true, "version": true}
	isBool := func(n string) bool { return n == "version" }
	kept, dropped := dropUnknownFlags(
		[]string{"--model", "m.gguf", "-ngl", "99", "--port=1", "--flash-attn", "--version", "--seed", "-1", "-c", "8192"},
		known, isBool)
	assert.Equal(t, []string{"--model", "m.gguf", "--port=1", "--version"}, kept)
	assert.Equal(t, []string{"-ngl 99", "--flash-attn", "--seed", "-1", "-c 8192"}, dropped)
}

func TestModelCarriesFault(t *testing.T) {
	dir := t.TempDir()
	m := filepath.Join(dir, "bad.gguf")
	require.NoError(t, os.WriteFile(m, []byte("GGUF\x03\x00\x00\x00\nsim-fault=exit:4\n"), 0o644))
	port := freePort(t)
	cmd := exec.Command(simBin, "--model", m, "--port", strconv.Itoa(port))
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, 4, ee.ExitCode())
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the model's fault did not fire")
	}
}

func TestKillSEGVFromOutsideKillsBySignal(t *testing.T) {
	dir := t.TempDir()
	m := filepath.Join(dir, "m.gguf")
	require.NoError(t, os.WriteFile(m, []byte("GGUF\x03\x00\x00\x00"), 0o644))
	port := freePort(t)
	cmd := exec.Command(simBin, "--model", m, "--port", strconv.Itoa(port))
	require.NoError(t, cmd.Start())
	defer cmd.Process.Kill()
	require.Eventually(t, func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", port))
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, 10*time.Second, 20*time.Millisecond)
	require.NoError(t, cmd.Process.Signal(syscall.SIGSEGV))
	err := cmd.Wait()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	ws := ee.Sys().(syscall.WaitStatus)
	assert.True(t, ws.Signaled())
	assert.Equal(t, syscall.SIGSEGV, ws.Signal())
}
