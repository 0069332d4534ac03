"""cuda-engine: the smallest real CUDA engine, for make gpu-check.

Through the driver's own libcuda.so.1 (ctypes: no torch, no nvcc) it makes
a context on CUDA device 0 (the first of CUDA_VISIBLE_DEVICES) and
allocates and writes --mib MiB there, then, by mode:
  --port N   serves GET /health (200) and GET /cuda (what it holds) on
             127.0.0.1:N until killed: a pool's engine;
  --hold     holds the context until killed: another process on the GPU;
  --probe    exits 0: the GPU can be used from here.
It prints one line once the memory is held (and the port bound). Any CUDA call that fails ends
it with status 1 and names the call and CUDA's error.
"""

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

LIBS = (
    "libcuda.so.1",
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    "/usr/lib64/libcuda.so.1",
    "/usr/local/nvidia/lib64/libcuda.so.1",
)


class Failed(Exception):
    pass


def load(path):
    tried = []
    for name in (path,) if path else LIBS:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            tried.append(str(e))
    raise Failed("libcuda.so.1 not found (no NVIDIA driver here?): " + "; ".join(tried))


def bind(lib):
    c = ctypes
    sigs = {
        "cuInit": [c.c_uint],
        "cuDeviceGetCount": [c.POINTER(c.c_int)],
        "cuDeviceGet": [c.POINTER(c.c_int), c.c_int],
        "cuDeviceGetName": [c.c_char_p, c.c_int, c.c_int],
        "cuCtxCreate_v2": [c.POINTER(c.c_void_p), c.c_uint, c.c_int],
        "cuMemAlloc_v2": [c.POINTER(c.c_uint64), c.c_size_t],
        "cuMemsetD8_v2": [c.c_uint64, c.c_ubyte, c.c_size_t],
        "cuCtxSynchronize": [],
        "cuGetErrorName": [c.c_int, c.POINTER(c.c_char_p)],
    }
    for name, args in sigs.items():
        try:
            f = getattr(lib, name)
        except AttributeError:
            raise Failed("libcuda.so.1 lacks %s" % name)
        f.argtypes = args
        f.restype = c.c_int


def call(lib, name, *args):
    rc = getattr(lib, name)(*args)
    if rc != 0:
        s = ctypes.c_char_p()
        what = "?"
        if lib.cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value:
            what = s.value.decode(errors="replace")
        raise Failed("%s failed: %d %s" % (name, rc, what))


def hold_gpu(lib, mib):
    """Returns the device's name once mib MiB are allocated and written."""
    bind(lib)
    call(lib, "cuInit", 0)
    n = ctypes.c_int()
    call(lib, "cuDeviceGetCount", ctypes.byref(n))
    if n.value < 1:
        raise Failed("cuDeviceGetCount counts no device (CUDA_VISIBLE_DEVICES=%s)" % os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    dev = ctypes.c_int()
    call(lib, "cuDeviceGet", ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    call(lib, "cuDeviceGetName", name, len(name), dev)
    ctx = ctypes.c_void_p()
    call(lib, "cuCtxCreate_v2", ctypes.byref(ctx), 0, dev)
    if mib > 0:
        ptr = ctypes.c_uint64()
        size = mib << 20
        call(lib, "cuMemAlloc_v2", ctypes.byref(ptr), size)
        # Written, so that the memory is the engine's for certain.
        call(lib, "cuMemsetD8_v2", ptr, 0x5A, size)
        call(lib, "cuCtxSynchronize")
    return name.value.decode(errors="replace")


def server(port, info):
    body = json.dumps(info).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self.answer(200, b'{"status":"ok"}')
            elif self.path == "/cuda":
                self.answer(200, body)
            else:
                self.answer(404, b'{"error":"not found"}')

        def answer(self, code, b):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def log_message(self, *args):
            pass

    return HTTPServer(("127.0.0.1", port), Handler)


def main(argv):
    ap = argparse.ArgumentParser(prog="cuda-engine")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--port", type=int, help="serve /health and /cuda on 127.0.0.1:PORT")
    mode.add_argument("--hold", action="store_true", help="hold the GPU until killed")
    mode.add_argument("--probe", action="store_true", help="exit 0 once the memory is held")
    ap.add_argument("--mib", type=int, default=256, help="MiB to allocate on the GPU (default 256)")
    ap.add_argument("--libcuda", default="", help="the driver library (default: libcuda.so.1 where the loader finds it)")
    a = ap.parse_args(argv)
    if a.mib < 0 or (a.port is not None and not 0 < a.port < 65536):
        ap.error("--mib must be >= 0 and --port in 1..65535")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        name = hold_gpu(load(a.libcuda), a.mib)
    except Failed as e:
        print("cuda-engine: %s" % e, file=sys.stderr, flush=True)
        return 1
    info = {"pid": os.getpid(), "device": name, "mib": a.mib,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    srv = None
    if a.port is not None:
        try:
            srv = server(a.port, info)
        except OSError as e:
            print("cuda-engine: port %d: %s" % (a.port, e), file=sys.stderr, flush=True)
            return 1
    print("cuda-engine: %s MiB held on %s (pid %d)" % (a.mib, name, os.getpid()), flush=True)
    if srv is not None:
        srv.serve_forever()
    elif a.hold:
        while True:
            time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
