package main

import (
	"encoding/json"
	"log"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type server struct {
	opts           options
	mu             sync.Mutex
	loaded         bool
	sha256         string
	hangHealth     atomic.Bool
	failCompletion atomic.Bool
	metrics        atomic.Int32 // a metricsMode
	engine         *engine
	shutdown       chan struct{} // closed on SIGTERM/SIGINT
	// listener is the HTTP listener (nil: none yet); closed: the
	// close-listener fault closed it.
	listener net.Listener
	closed   atomic.Bool
}

// closeListener closes the HTTP listener, once; false when there is none.
func (s *server) closeListener() bool {
	s.mu.Lock()
	ln := s.listener
	s.mu.Unlock()
	if ln == nil || s.closed.Swap(true) {
		return false
	}
	ln.Close()
	return true
}

func newServer(o options) *server {
	shutdown := make(chan struct{})
	return &server{opts: o, engine: newEngine(o.tokenTime, shutdown), shutdown: shutdown}
}

func (s *server) setLoaded(sum string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sha256, s.loaded = sum, true
}

func (s *server) state() (loaded bool, sum string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loaded, s.sha256
}

func (s *server) httpServer() *http.Server {
	mux := serveMux([]route{
		{"/health", s.handleHealth}, {"/v1/health", s.handleHealth},
		{"/v1/models", s.handleModels}, {"/models", s.handleModels},
		{"/metrics", s.handleMetrics},
		{"/completion", s.handleCompletion}, {"/completions", s.handleCompletion},
		{"/sim/devices", s.handleDevices},
		{"/sim/fault", s.handleFault},
	}, func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "File Not Found", "not_found_error")
	})
	return simHTTPServer(accessLog(mux), "srv  http: ")
}

type route struct {
	path    string
	handler http.HandlerFunc
}

// serveMux answers each route's path with its handler, and any other
// with notFound.
func serveMux(routes []route, notFound http.HandlerFunc) *http.ServeMux {
	mux := http.NewServeMux()
	for _, rt := range routes {
		mux.HandleFunc(rt.path, rt.handler)
	}
	mux.HandleFunc("/", notFound)
	return mux
}

// simHTTPServer serves h, logging the HTTP server's own errors to stderr
// behind prefix as the engine would.
func simHTTPServer(h http.Handler, prefix string) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(stderrWriter{}, prefix, 0),
	}
}

type stderrWriter struct{}

func (stderrWriter) Write(b []byte) (int, error) {
	logf("%s", b)
	return len(b), nil
}

// recorder keeps the status for the access line and lets a handler run
// something (a fault) after the response is out and the line is logged.
type recorder struct {
	http.ResponseWriter
	status int
	after  func()
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// logRequests calls line for each request once it is answered, with the
// status, and then runs a fault the handler left for after the answer.
func logRequests(h http.Handler, line func(r *http.Request, status int)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &recorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		line(r, rec.status)
		if rec.after != nil {
			rec.after()
		}
	})
}

func accessLog(h http.Handler) http.Handler {
	return logRequests(h, func(r *http.Request, status int) {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			host = r.RemoteAddr
		}
		logf("srv  log_server_r: request: %s %s %s %d", r.Method, r.URL.Path, host, status)
	})
}

// writeJSON sets Content-Length so that a flushed response is complete on
// the wire even if the process dies before the handler returns.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":{"code":500,"message":"encoding failed","type":"server_error"}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, status int, msg, typ string) {
	writeJSON(w, status, map[string]any{
		"error": map[string]any{"code": status, "message": msg, "type": typ},
	})
}

func allowMethods(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	if slices.Contains(methods, r.Method) {
		return true
	}
	w.Header().Set("Allow", methods[0])
	writeError(w, http.StatusMethodNotAllowed, "Method Not Allowed", "invalid_request_error")
	return false
}

// hang never answers: it drops the connection without a response once
// the client gives up or the process shuts down.
func (s *server) hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-s.shutdown:
	}
	panic(http.ErrAbortHandler)
}

// loadedFor passes a request in one of methods once the model is
// loaded, and answers any other as llama-server does.
func (s *server) loadedFor(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	if !allowMethods(w, r, methods...) {
		return false
	}
	if loaded, _ := s.state(); !loaded {
		writeError(w, http.StatusServiceUnavailable, "Loading model", "unavailable_error")
		return false
	}
	return true
}

func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if s.hangHealth.Load() {
		s.hang(r)
	}
	if loaded, _ := s.state(); !loaded {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "loading model"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

type modelMeta struct {
	SHA256 string `json:"sha256"`
	Path   string `json:"path"`
}

type modelEntry struct {
	ID      string    `json:"id"`
	Object  string    `json:"object"`
	OwnedBy string    `json:"owned_by"`
	Meta    modelMeta `json:"meta"`
}

type modelList struct {
	Object string       `json:"object"`
	Data   []modelEntry `json:"data"`
}

func (s *server) handleModels(w http.ResponseWriter, r *http.Request) {
	if !s.loadedFor(w, r, http.MethodGet) {
		return
	}
	_, sum := s.state()
	writeJSON(w, http.StatusOK, modelList{
		Object: "list",
		Data: []modelEntry{{
			ID:      filepath.Base(s.opts.model),
			Object:  "model",
			OwnedBy: "llamacpp",
			Meta:    modelMeta{SHA256: sum, Path: s.opts.model},
		}},
	})
}

func (s *server) handleDevices(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet) {
		return
	}
	out := make(map[string]string, len(s.opts.probeDevices))
	for _, p := range s.opts.probeDevices {
		out[p] = probeDevice(p)
	}
	writeJSON(w, http.StatusOK, out)
}

// probeDevice opens the path as a CUDA runtime opens /dev/nvidia*, so the
// cgroup device controller (EPERM) and permissions (EACCES) show.
func probeDevice(path string) string {
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC|syscall.O_NOCTTY, 0)
	if err != nil {
		if errno, ok := err.(syscall.Errno); ok {
			return errnoName(errno)
		}
		return err.Error()
	}
	_ = syscall.Close(fd)
	return "ok"
}

var errnoNames = map[syscall.Errno]string{
	syscall.EPERM:        "EPERM",
	syscall.ENOENT:       "ENOENT",
	syscall.EINTR:        "EINTR",
	syscall.EIO:          "EIO",
	syscall.ENXIO:        "ENXIO",
	syscall.EAGAIN:       "EAGAIN",
	syscall.ENOMEM:       "ENOMEM",
	syscall.EACCES:       "EACCES",
	syscall.EFAULT:       "EFAULT",
	syscall.EBUSY:        "EBUSY",
	syscall.EEXIST:       "EEXIST",
	syscall.ENODEV:       "ENODEV",
	syscall.ENOTDIR:      "ENOTDIR",
	syscall.EISDIR:       "EISDIR",
	syscall.EINVAL:       "EINVAL",
	syscall.ENFILE:       "ENFILE",
	syscall.EMFILE:       "EMFILE",
	syscall.ETXTBSY:      "ETXTBSY",
	syscall.EROFS:        "EROFS",
	syscall.ENAMETOOLONG: "ENAMETOOLONG",
	syscall.ELOOP:        "ELOOP",
	syscall.EOPNOTSUPP:   "EOPNOTSUPP",
	syscall.ENOSPC:       "ENOSPC",
	syscall.EOVERFLOW:    "EOVERFLOW",
}

func errnoName(e syscall.Errno) string {
	if n, ok := errnoNames[e]; ok {
		return n
	}
	return "errno " + strconv.Itoa(int(e))
}

func (s *server) handleFault(w http.ResponseWriter, r *http.Request) {
	serveFault(w, r, parseFault, s.fire)
}

// serveFault answers POST /sim/fault?kind=K with 202 and fires the fault:
// before the answer if it acts on later requests, else once the answer
// is out and logged, so that the client sees it whatever the fault does.
func serveFault(w http.ResponseWriter, r *http.Request, parse func(string) (fault, error), fire func(fault)) {
	if !allowMethods(w, r, http.MethodPost) {
		return
	}
	f, err := parse(r.FormValue("kind"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error(), "invalid_request_error")
		return
	}
	if f.kind.beforeAnswer() {
		fire(f)
		writeJSON(w, http.StatusAccepted, map[string]string{"fault": f.String()})
		return
	}
	w.Header().Set("Connection", "close")
	writeJSON(w, http.StatusAccepted, map[string]string{"fault": f.String()})
	if rec, ok := w.(*recorder); ok {
		rec.Flush()
		rec.after = func() { fire(f) }
		return
	}
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	fire(f)
}
