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

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	simBin     string
	buildFlags = []string{"build"}
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pool-engine-sim-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	simBin = filepath.Join(dir, "pool-engine-sim")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	build := exec.CommandContext(ctx, "go", append(buildFlags, "-o", simBin, ".")...)
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
	return startSimArgs(t, port, args...)
}

// startSimArgs starts the simulator with exactly args, serving on port.
func startSimArgs(t *testing.T, port int, args ...string) *sim {
	t.Helper()
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
		if strings.Contains(s.stderr.String(), "WARNING: DATA RACE") {
			t.Error("the race detector found a race in the simulator")
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
	code, _, stderr = runSim(t, "--model", model, "--port", "1", "--token-time", "-1ms")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "invalid --token-time -1ms")
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

// scrape reads /metrics the way the daemon does, with Prometheus's text
// parser, and returns each sample's value by metric name.
func (s *sim) scrape() map[string]float64 {
	s.t.Helper()
	resp, err := client(2 * time.Second).Get(s.url("/metrics"))
	require.NoError(s.t, err)
	defer resp.Body.Close()
	require.Equal(s.t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(prommodel.LegacyValidation)
	families, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(s.t, err)
	out := map[string]float64{}
	for name, mf := range families {
		require.Len(s.t, mf.GetMetric(), 1, name)
		m := mf.GetMetric()[0]
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			out[name] = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			out[name] = m.GetGauge().GetValue()
		}
	}
	return out
}

type completion struct {
	code int
	body []byte
	err  error
}

func (s *sim) complete(ctx context.Context, body string) completion {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url("/completion"), strings.NewReader(body))
	if err != nil {
		return completion{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client(0).Do(req)
	if err != nil {
		return completion{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return completion{code: resp.StatusCode, body: b, err: err}
}

// completeAsync starts a /completion and returns where its outcome lands.
func (s *sim) completeAsync(ctx context.Context, body string) <-chan completion {
	done := make(chan completion, 1)
	go func() { done <- s.complete(ctx, body) }()
	return done
}

// waitMetrics polls /metrics until ok holds, and returns that sample.
func (s *sim) waitMetrics(what string, ok func(map[string]float64) bool) map[string]float64 {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m := s.scrape()
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("metrics never showed %s; last %v", what, m)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

const (
	inFlight  = "llamacpp:requests_processing"
	predicted = "llamacpp:tokens_predicted_total"
	decodes   = "llamacpp:n_decode_total"
)

func TestCompletionMovesMetrics(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--token-time", "20ms", "--metrics")
	s.waitHealthy()

	resp, err := client(2 * time.Second).Get(s.url("/metrics"))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.True(t, strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4"), resp.Header.Get("Content-Type"))
	for _, line := range []string{
		"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 0\n",
		"# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 0\n",
		"# TYPE llamacpp:n_decode_total counter\nllamacpp:n_decode_total 0\n",
	} {
		assert.Contains(t, string(body), line)
	}
	assert.NotContains(t, string(body), "go_goroutines", "llama-server has no Go collectors")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := s.completeAsync(ctx, `{"prompt":"Hi","n_predict":25}`)
	mid := s.waitMetrics("a request in flight that has produced tokens", func(m map[string]float64) bool {
		return m[inFlight] == 1 && m[predicted] > 0
	})
	assert.Less(t, mid[predicted], 25.0, "tokens come one at a time, not all at the end")

	var c completion
	select {
	case c = <-done:
	case <-ctx.Done():
		t.Fatal("/completion did not answer")
	}
	require.NoError(t, c.err)
	require.Equal(t, http.StatusOK, c.code, string(c.body))
	var got struct {
		Content         string `json:"content"`
		TokensPredicted int    `json:"tokens_predicted"`
		Stop            bool   `json:"stop"`
	}
	require.NoError(t, json.Unmarshal(c.body, &got))
	assert.Equal(t, 25, got.TokensPredicted)
	assert.True(t, got.Stop)
	assert.NotEmpty(t, got.Content)
	after := s.scrape()
	assert.Equal(t, map[string]float64{inFlight: 0, predicted: 25, decodes: 25}, after)
	s.waitLog(`srv  log_server_r: request: POST /completion 127\.0\.0\.1 200\n`)
}

func TestCompletionNPredict(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--token-time", "0")
	s.waitHealthy()
	for _, tc := range []struct {
		name string
		body string
		want int
	}{
		{"default", `{"prompt":"Hi"}`, 16},
		{"zero", `{"prompt":"Hi","n_predict":0}`, 0},
		{"until the context is full, capped", `{"prompt":"Hi","n_predict":-1}`, 4096},
		{"over the cap", `{"prompt":"Hi","n_predict":100000}`, 4096},
		{"token prompt", `{"prompt":[1,2,3],"n_predict":2}`, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := s.complete(ctx, tc.body)
			require.NoError(t, c.err)
			require.Equal(t, http.StatusOK, c.code, string(c.body))
			var got struct {
				TokensPredicted int `json:"tokens_predicted"`
			}
			require.NoError(t, json.Unmarshal(c.body, &got))
			assert.Equal(t, tc.want, got.TokensPredicted)
		})
	}
	assert.Equal(t, float64(16+0+4096+4096+2), s.scrape()[predicted])
}

// Bad bodies get a clear 4xx and produce nothing; the prompt, engine
// input, never reaches the log the daemon scans for CUDA errors.
func TestCompletionRejectsBadBodies(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()

	nearLimit := `{"prompt":"` + strings.Repeat("a", 1<<20-100) + `","n_predict":1}`
	overLimit := `{"prompt":"` + strings.Repeat("a", 1<<20) + `"}`
	for _, tc := range []struct {
		name string
		body string
		code int
		msg  string
	}{
		{"bad JSON", `{"prompt":`, http.StatusBadRequest, "not valid JSON"},
		{"trailing garbage", `{"prompt":"Hi"} x`, http.StatusBadRequest, "not valid JSON"},
		{"not an object", `["Hi"]`, http.StatusBadRequest, "not valid JSON"},
		{"no prompt", `{"n_predict":1}`, http.StatusBadRequest, `\"prompt\" must be provided`},
		{"prompt of the wrong type", `{"prompt":7}`, http.StatusBadRequest, `\"prompt\" must be a string or an array`},
		{"n_predict not a number", `{"prompt":"Hi","n_predict":"x"}`, http.StatusBadRequest, "n_predict"},
		{"streaming", `{"prompt":"Hi","stream":true}`, http.StatusBadRequest, "stream"},
		{"over 1 MiB", overLimit, http.StatusRequestEntityTooLarge, "larger than 1 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := s.complete(ctx, tc.body)
			require.NoError(t, c.err)
			assert.Equal(t, tc.code, c.code, string(c.body))
			assert.Contains(t, string(c.body), tc.msg)
			assert.Contains(t, string(c.body), fmt.Sprintf(`"code":%d`, tc.code))
		})
	}
	assert.Equal(t, map[string]float64{inFlight: 0, predicted: 0, decodes: 0}, s.scrape())

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := s.complete(ctx, nearLimit)
	require.NoError(t, c.err)
	assert.Equal(t, http.StatusOK, c.code, "a body just under 1 MiB is fine")
	c = s.complete(ctx, `{"prompt":"CUDA error: out of memory","n_predict":1}`)
	require.NoError(t, c.err)
	require.Equal(t, http.StatusOK, c.code, string(c.body))

	code, _ := s.get("/completion", 2*time.Second)
	assert.Equal(t, http.StatusMethodNotAllowed, code)
	s.waitLog(`request: GET /completion 127\.0\.0\.1 405\n`)
	assert.NotContains(t, s.stderr.String(), "CUDA error")
	assert.NotContains(t, s.stderr.String(), "aaaaaaaa")
	assert.True(t, s.alive())
}

func TestServingWhileLoading(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--load-time", "1m")
	s.waitListening()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := s.complete(ctx, `{"prompt":"Hi","n_predict":1}`)
	require.NoError(t, c.err)
	assert.Equal(t, http.StatusServiceUnavailable, c.code)
	assert.JSONEq(t, `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`, string(c.body))
	code, body := s.get("/metrics", 2*time.Second)
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, string(body), "Loading model")
}

// stall: a request stays in flight, the token counter freezes, any new
// /completion hangs, and /health still says ok.
func TestFaultStall(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model, "--token-time", "2ms")
	s.waitHealthy()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := s.complete(ctx, `{"prompt":"Hi","n_predict":5}`)
	require.Equal(t, http.StatusOK, c.code, string(c.body))

	// A long request running when the stall comes stays in flight too.
	running := s.completeAsync(ctx, `{"prompt":"Hi","n_predict":4096}`)
	s.waitMetrics("the long request producing", func(m map[string]float64) bool { return m[predicted] > 5 })
	s.postFault("stall")
	frozen := s.scrape()
	assert.GreaterOrEqual(t, frozen[inFlight], 2.0)

	hung, stop := context.WithCancel(ctx)
	defer stop()
	blocked := s.completeAsync(hung, `{"prompt":"Hi","n_predict":1}`)
	m := s.waitMetrics("the new request in flight", func(m map[string]float64) bool { return m[inFlight] >= 3 })
	assert.Equal(t, frozen[predicted], m[predicted])

	// Across many token times: nothing moves, nothing answers.
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		m := s.scrape()
		assert.Equal(t, frozen[predicted], m[predicted])
		assert.Equal(t, frozen[decodes], m[decodes])
		assert.GreaterOrEqual(t, m[inFlight], 3.0)
	}
	start := time.Now()
	code, body := s.get("/health", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	assert.JSONEq(t, `{"status":"ok"}`, string(body))
	assert.Less(t, time.Since(start), time.Second)
	select {
	case c := <-blocked:
		t.Fatalf("a /completion answered on a stalled engine: %d %s", c.code, c.body)
	case c := <-running:
		t.Fatalf("the running /completion answered on a stalled engine: %d %s", c.code, c.body)
	default:
	}

	// The client giving up ends its request; the stuck one stays.
	stop()
	<-blocked
	s.waitMetrics("the cancelled request gone", func(m map[string]float64) bool { return m[inFlight] == 2 })
	cancel()
	<-running
	s.waitMetrics("only the stuck request", func(m map[string]float64) bool { return m[inFlight] == 1 })
	assert.Equal(t, frozen[predicted], s.scrape()[predicted])

	// A stalled engine still stops on SIGTERM.
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
	ws := s.wait()
	require.True(t, ws.Exited(), "got %v", ws)
	assert.Equal(t, 0, ws.ExitStatus())
}

// busy: a request is always in flight and the counter keeps moving, slowly.
func TestFaultBusy(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("busy")

	first := s.scrape()
	assert.GreaterOrEqual(t, first[inFlight], 1.0)
	last := first[predicted]
	for moves := 0; moves < 3; moves++ {
		m := s.waitMetrics("the counter moving", func(m map[string]float64) bool {
			assert.GreaterOrEqual(t, m[inFlight], 1.0, "a busy engine has a request in flight at every sample")
			return m[predicted] > last
		})
		last = m[predicted]
	}
	code, _ := s.get("/health", time.Second)
	assert.Equal(t, http.StatusOK, code)

	// A request on a busy engine is slow but answers.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c := s.complete(ctx, `{"prompt":"Hi","n_predict":2}`)
	require.NoError(t, c.err)
	assert.Equal(t, http.StatusOK, c.code, string(c.body))
	assert.GreaterOrEqual(t, time.Since(start), 2*200*time.Millisecond)
	assert.GreaterOrEqual(t, s.scrape()[inFlight], 1.0)
}

func TestFaultFailCompletion(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := s.complete(ctx, `{"prompt":"Hi","n_predict":1}`)
	require.Equal(t, http.StatusOK, c.code, string(c.body))

	s.postFault("fail-completion")
	for range 2 {
		c = s.complete(ctx, `{"prompt":"Hi","n_predict":1}`)
		require.NoError(t, c.err)
		assert.Equal(t, http.StatusInternalServerError, c.code)
		assert.JSONEq(t, `{"error":{"code":500,"message":"simulated failure","type":"server_error"}}`, string(c.body))
	}
	code, _ := s.get("/health", 2*time.Second)
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, map[string]float64{inFlight: 0, predicted: 1, decodes: 1}, s.scrape())
}

func TestFaultMetrics(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		kind  string
		check func(t *testing.T, s *sim)
	}{
		{"no-metrics", func(t *testing.T, s *sim) {
			code, body := s.get("/metrics", 2*time.Second)
			assert.Equal(t, http.StatusNotFound, code)
			assert.Contains(t, string(body), "File Not Found")
		}},
		{"bad-metrics", func(t *testing.T, s *sim) {
			resp, err := client(2 * time.Second).Get(s.url("/metrics"))
			require.NoError(t, err)
			defer resp.Body.Close()
			assert.Equal(t, http.StatusOK, resp.StatusCode)
			p := expfmt.NewTextParser(prommodel.LegacyValidation)
			_, err = p.TextToMetricFamilies(resp.Body)
			assert.Error(t, err, "bad-metrics must not parse")
		}},
		{"hang-metrics", func(t *testing.T, s *sim) {
			_, err := client(300 * time.Millisecond).Get(s.url("/metrics"))
			var ne net.Error
			require.ErrorAs(t, err, &ne)
			assert.True(t, ne.Timeout(), "%v", err)
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			t.Parallel()
			model, _ := ggufModel(t)
			s := startSim(t, model)
			s.waitHealthy()
			s.scrape()
			s.postFault(tc.kind)
			tc.check(t, s)
			code, _ := s.get("/health", 2*time.Second)
			assert.Equal(t, http.StatusOK, code)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := s.complete(ctx, `{"prompt":"Hi","n_predict":1}`)
			assert.Equal(t, http.StatusOK, c.code, "only /metrics is broken")
		})
	}
}

// The serving faults also come from --fault and from the model file, so a
// pool's ExecStart= or model can carry them.
func TestServingFaultsFromFlagAndModel(t *testing.T) {
	t.Parallel()
	t.Run("--fault stall", func(t *testing.T) {
		t.Parallel()
		model, _ := ggufModel(t)
		s := startSim(t, model, "--fault", "stall", "--fault-after", "50ms")
		s.waitHealthy()
		s.waitMetrics("the stuck request", func(m map[string]float64) bool { return m[inFlight] == 1 })
	})
	t.Run("sim-fault=fail-completion", func(t *testing.T) {
		t.Parallel()
		model := writeModel(t, []byte("GGUF\x03\x00\x00\x00\nsim-fault=fail-completion\n"))
		s := startSim(t, model)
		s.waitHealthy()
		s.waitLog(`sim: fail-completion`)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := s.complete(ctx, `{"prompt":"Hi","n_predict":1}`)
		assert.Equal(t, http.StatusInternalServerError, c.code, string(c.body))
	})
}

func TestParseServingFaults(t *testing.T) {
	for _, kind := range []string{"stall", "busy", "fail-completion", "no-metrics", "bad-metrics", "hang-metrics", "close-listener"} {
		f, err := parseFault(kind)
		require.NoError(t, err, kind)
		assert.Equal(t, kind, f.String())
		assert.True(t, f.kind.beforeAnswer(), "%s leaves the engine running", kind)
	}
	_, err := parseFault("stalled")
	assert.ErrorContains(t, err, "stall, busy, fail-completion, no-metrics, bad-metrics, hang-metrics or close-listener")
}

// close-listener frees the engine's port while its process runs on:
// another process may take the port, as a squatter would.
func TestCloseListenerFreesThePortAndTheProcessRunsOn(t *testing.T) {
	t.Parallel()
	model, _ := ggufModel(t)
	s := startSim(t, model)
	s.waitHealthy()
	s.postFault("close-listener")
	s.waitLog(`sim: close-listener`)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
	require.NoError(t, err, "the port is free")
	ln.Close()
	time.Sleep(100 * time.Millisecond)
	assert.True(t, s.alive(), "the process runs on")
}
