package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// vllmOptions are the vLLM mode's flags (--engine vllm): vLLM's own names
// where vLLM has the setting.
type vllmOptions struct {
	options
	servedName  string
	gpuMemMB    int
	sleepMode   bool
	maxNumSeqs  int
	maxModelLen int
	keepAlive   bool // VLLM_KEEP_ALIVE_ON_ENGINE_DEATH
	deadHealth  int  // /health's status once the engine core is gone and the server stays
	engineCore  bool
	modelFault  string // config.json's sim_fault
}

// defaultGPUMemMB is the simulated GPU memory the engine core holds while
// awake: small, so tests can run many.
const defaultGPUMemMB = 16

// vllmBoolFlags are the vLLM flags the simulator drops that take no value.
var vllmBoolFlags = map[string]bool{
	"enforce-eager": true, "trust-remote-code": true, "disable-log-requests": true, "enable-log-requests": true,
	"disable-log-stats": true, "enable-prefix-caching": true, "no-enable-prefix-caching": true,
	"enable-chunked-prefill": true, "disable-custom-all-reduce": true, "enable-auto-tool-choice": true,
	"disable-frontend-multiprocessing": true, "enable-lora": true, "headless": true,
}

func runVLLM(args []string) int {
	fs := flag.NewFlagSet("pool-engine-sim --engine vllm", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	var o vllmOptions
	fs.String("engine", "vllm", "the engine to stand in for: llamacpp or vllm")
	fs.StringVar(&o.model, "model", "", "model `directory` (Hugging Face layout: config.json, *.safetensors); also the first argument after serve")
	fs.StringVar(&o.servedName, "served-model-name", "", "the model's name in the API (default: the directory's name)")
	fs.StringVar(&o.host, "host", "127.0.0.1", "address to listen on")
	fs.IntVar(&o.port, "port", 8000, "port to listen on (0 picks one)")
	fs.DurationVar(&o.loadTime, "load-time", 0, "how long the engine core takes to load, /health answering 503 meanwhile")
	fs.DurationVar(&o.listenAfter, "listen-after", 0, "wait this long before listening at all")
	fs.DurationVar(&o.tokenTime, "token-time", time.Millisecond, "time the engine core takes to generate one token")
	fs.StringVar(&o.fault, "fault", "", "fault `kind` to inject on its own: "+vllmFaultKindsHelp)
	fs.DurationVar(&o.faultAfter, "fault-after", 0, "delay between listening and --fault firing")
	probe := fs.String("probe-devices", "", "comma-separated device `paths` that /sim/devices opens O_RDWR")
	fs.IntVar(&o.gpuMemMB, "gpu-mem-mb", defaultGPUMemMB, "MiB of simulated GPU memory the engine core holds while awake")
	fs.BoolVar(&o.sleepMode, "enable-sleep-mode", false, "serve /sleep, /wake_up and /is_sleeping")
	fs.IntVar(&o.maxNumSeqs, "max-num-seqs", 256, "requests running at once; more wait")
	fs.IntVar(&o.maxModelLen, "max-model-len", 0, "context length (default: config.json's max_position_embeddings, else 4096)")
	fs.BoolVar(&o.keepAlive, "keep-alive-on-engine-death", os.Getenv("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH") == "1",
		"keep the API server running when the engine core dies (default: exit 1, as vLLM V1)")
	fs.IntVar(&o.deadHealth, "dead-health-status", http.StatusOK, "/health's status once the engine core died and the API server stayed: 200 or 503")
	fs.BoolVar(&o.engineCore, "engine-core", false, "internal: run as the API server's engine-core process")
	version := fs.Bool("version", false, "print the version and exit")

	known := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) { known[f.Name] = true })
	known["h"], known["help"] = true, true
	args, ignored := dropUnknownFlags(args, known, func(name string) bool {
		switch name {
		case "version", "engine-core", "enable-sleep-mode", "keep-alive-on-engine-death", "h", "help":
			return true
		}
		return vllmBoolFlags[name]
	})
	// vllm serve MODEL [flags]: positionals may come before flags.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			return 1
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if *version {
		fmt.Println(vllmVersion)
		return 0
	}
	if o.engineCore {
		return runEngineCore(o)
	}
	setProcPrefix("APIServer")
	for _, a := range ignored {
		logf("%ssim: ignoring vLLM argument %s", procPrefix, a)
	}
	if len(positional) > 0 && positional[0] == "serve" {
		positional = positional[1:]
	}
	if len(positional) > 1 {
		writeLines(os.Stderr, "vllm: error: unrecognized arguments: "+strings.Join(positional[1:], " "))
		return 2
	}
	if len(positional) == 1 {
		if o.model != "" && o.model != positional[0] {
			writeLines(os.Stderr, "vllm: error: the model is given twice: "+positional[0]+" and --model "+o.model)
			return 2
		}
		o.model = positional[0]
	}
	if o.model == "" {
		writeLines(os.Stderr, "vllm: error: the following arguments are required: model_tag")
		return 2
	}
	switch {
	case o.port < 0 || o.port > 65535:
		writeLines(os.Stderr, fmt.Sprintf("vllm: error: argument --port: invalid port %d", o.port))
		return 2
	case o.tokenTime < 0:
		writeLines(os.Stderr, fmt.Sprintf("vllm: error: argument --token-time: invalid %v (want 0 or more)", o.tokenTime))
		return 2
	case o.gpuMemMB < 0:
		writeLines(os.Stderr, fmt.Sprintf("vllm: error: argument --gpu-mem-mb: invalid %d", o.gpuMemMB))
		return 2
	case o.maxNumSeqs < 1:
		writeLines(os.Stderr, fmt.Sprintf("vllm: error: argument --max-num-seqs: invalid %d", o.maxNumSeqs))
		return 2
	case o.deadHealth != http.StatusOK && o.deadHealth != http.StatusServiceUnavailable:
		writeLines(os.Stderr, fmt.Sprintf("vllm: error: argument --dead-health-status: invalid %d (want 200 or 503)", o.deadHealth))
		return 2
	}
	for _, d := range strings.Split(*probe, ",") {
		if d = strings.TrimSpace(d); d != "" {
			o.probeDevices = append(o.probeDevices, d)
		}
	}
	if o.fault != "" {
		if _, err := parseVLLMFault(o.fault); err != nil {
			writeLines(os.Stderr, "vllm: error: argument --fault: "+err.Error())
			return 2
		}
	}
	return serveVLLM(o)
}

// vllmFaultKindsHelp lists the vLLM mode's fault kinds.
const vllmFaultKindsHelp = "child-exit, child-exit-server-exits, child-oom, sleep-fail, wake-fail, wake-hang, " + faultKindsHelp

// parseVLLMFault knows the engine-core faults besides the common ones.
func parseVLLMFault(s string) (fault, error) {
	if k, ok := vllmFaultNames[s]; ok {
		return fault{kind: k}, nil
	}
	f, err := parseFault(s)
	if err != nil {
		return fault{}, fmt.Errorf("unknown fault kind %q (want %s)", s, vllmFaultKindsHelp)
	}
	return f, nil
}

// hfConfig is what the simulator reads of config.json; sim_fault and
// sim_load_time let one test model misbehave or load slowly.
type hfConfig struct {
	Architectures         []string `json:"architectures"`
	MaxPositionEmbeddings int      `json:"max_position_embeddings"`
	SimFault              string   `json:"sim_fault"`
	SimLoadTime           string   `json:"sim_load_time"`
}

// checkModelDir does what vLLM's get_config does with a local path: it
// must be a directory with a config.json (vLLM's GGUF files are not
// simulated). It reports the failure as vLLM does, a traceback ending in
// the exception, and returns false.
func checkModelDir(o *vllmOptions) (hfConfig, bool) {
	var cfg hfConfig
	invalid := func() (hfConfig, bool) {
		traceback(apiServerFrames, "ValueError: Invalid repository ID or local directory specified: '"+o.model+"'.\n"+
			"Please verify the following requirements:\n"+
			"1. Provide a valid Hugging Face repository ID.\n"+
			"2. Specify a local directory that contains a recognized configuration file.\n"+
			"   - For Hugging Face models: ensure the presence of a 'config.json'.\n"+
			"   - For Mistral models: ensure the presence of a 'params.json'.")
		return cfg, false
	}
	st, err := os.Stat(o.model)
	if err != nil || !st.IsDir() {
		return invalid()
	}
	path := filepath.Join(o.model, "config.json")
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return invalid()
	case err != nil:
		traceback(apiServerFrames, fmt.Sprintf("%s: [Errno %d] %s: '%s'", pyErrType(err), errnoOf(err), errText(err), path))
		return cfg, false
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		traceback(apiServerFrames, "OSError: It looks like the config file at '"+path+"' is not a valid JSON file.")
		return cfg, false
	}
	return cfg, true
}

func serveVLLM(o vllmOptions) int {
	vlog("INFO", "api_server.py:1885", "vLLM API server version %s", vllmVersion)
	nonDefault := fmt.Sprintf("'model': '%s', 'host': '%s', 'port': %d", o.model, o.host, o.port)
	if o.sleepMode {
		nonDefault += ", 'enable_sleep_mode': True"
	}
	vlog("INFO", "utils.py:328", "non-default args: {%s}", nonDefault)
	cfg, ok := checkModelDir(&o)
	if !ok {
		return 1
	}
	arch := "LlamaForCausalLM"
	if len(cfg.Architectures) > 0 {
		arch = cfg.Architectures[0]
	}
	if o.maxModelLen == 0 {
		o.maxModelLen = cfg.MaxPositionEmbeddings
	}
	if o.maxModelLen <= 0 {
		o.maxModelLen = 4096
	}
	if o.servedName == "" {
		o.servedName = filepath.Base(filepath.Clean(o.model))
	}
	if d, err := time.ParseDuration(cfg.SimLoadTime); err == nil && d > 0 {
		o.loadTime += d
	}
	if cfg.SimFault != "" {
		if _, err := parseVLLMFault(cfg.SimFault); err == nil {
			o.modelFault = cfg.SimFault
		}
	}
	vlog("INFO", "model.py:547", "Resolved architecture: %s", arch)
	vlog("INFO", "model.py:1510", "Using max model len %d", o.maxModelLen)
	if o.sleepMode {
		vlog("INFO", "api_server.py:1630", "sleep mode is enabled")
	}

	v := newVLLMServer(o)
	core, err := startCore(o, v.token)
	if err != nil {
		traceback(apiServerFrames, "RuntimeError: Engine process failed to start: "+err.Error())
		return 1
	}
	v.core = core
	go v.watchCore()

	time.Sleep(o.listenAfter)
	ln, err := net.Listen("tcp", net.JoinHostPort(o.host, strconv.Itoa(o.port)))
	if err != nil {
		core.stop()
		traceback(apiServerFrames, fmt.Sprintf("OSError: [Errno %d] error while attempting to bind on address ('%s', %d): %s",
			errnoOf(err), o.host, o.port, errText(err)))
		return 1
	}
	port := ln.Addr().(*net.TCPAddr).Port
	srv := v.httpServer()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			vlog("ERROR", "launcher.py:90", "HTTP server error: %v", err)
			os.Exit(1)
		}
	}()
	uvlog("Started server process [%d]", os.Getpid())
	uvlog("Waiting for application startup.")

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	if o.fault != "" {
		f, _ := parseVLLMFault(o.fault)
		time.AfterFunc(max(o.faultAfter, 0), func() { v.fire(f) })
	}
	go v.statsLoop()
	go func() {
		select {
		case <-core.ready:
		case <-core.gone:
			return // watchCore reports it
		}
		v.setLoaded("")
		vlog("INFO", "api_server.py:1971", "Starting vLLM API server 0 on http://%s", net.JoinHostPort(o.host, strconv.Itoa(port)))
		vlog("INFO", "launcher.py:36", "Available routes are:")
		for _, r := range v.routes() {
			vlog("INFO", "launcher.py:44", "Route: %s", r)
		}
		uvlog("Application startup complete.")
		if o.modelFault != "" {
			f, _ := parseVLLMFault(o.modelFault)
			logf("%ssim: model asks for fault %s", procPrefix, f)
			go v.fire(f)
		}
	}()

	<-sigs
	// An engine core that died just before (an OOM kill, then the
	// scope's stop) is still a failure, not a clean stop.
	died := core.dead() && !v.keepAlive.Load()
	uvlog("Shutting down")
	close(v.shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
	}
	uvlog("Waiting for application shutdown.")
	core.stop()
	uvlog("Application shutdown complete.")
	uvlog("Finished server process [%d]", os.Getpid())
	if died {
		return 1
	}
	return 0
}

// watchCore reports the engine core's end unless the API server ended it:
// before it was ready, as vLLM's startup failure; after, as V1's monitor
// does, and then the API server exits 1 unless it is to keep serving.
func (v *vllmServer) watchCore() {
	<-v.core.gone
	if v.core.closing.Load() {
		return
	}
	code := v.core.exitCode()
	if loaded, _ := v.state(); !loaded {
		traceback(apiServerFrames,
			fmt.Sprintf("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': %d}", code))
		os.Exit(1)
	}
	vlog("ERROR", "core_client.py:564", "Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.")
	if v.keepAlive.Load() {
		v.dead.Store(true)
		return
	}
	vlog("ERROR", "async_llm.py:480", "%s", "AsyncLLM output_handler failed.\n"+
		"Traceback (most recent call last):\n"+
		`  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/async_llm.py", line 439, in output_handler`+"\n"+
		"    outputs = await engine_core.get_output_async()\n"+
		`  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core_client.py", line 846, in get_output_async`+"\n"+
		"    raise self._format_exception(outputs) from None\n"+
		"vllm.v1.engine.exceptions.EngineDeadError: "+errEngineDead.Error())
	uvlog("Shutting down")
	uvlog("Finished server process [%d]", os.Getpid())
	os.Exit(1)
}
