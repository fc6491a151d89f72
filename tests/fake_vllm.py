"""A stand-in for `vllm serve`, to test the engine's life cycle without a GPU.

    python fake_vllm.py ready PORT [DELAY]   log a few lines, answer /health after DELAY s
    python fake_vllm.py die                  log a few lines, exit 3 before listening
    python fake_vllm.py hang                 log a line, never listen
    python fake_vllm.py orphan PIDFILE       start a worker that outlives it, write its pid, exit 1
"""

import http.server
import subprocess
import sys
import time


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main() -> None:
    mode = sys.argv[1]
    print("INFO starting fake vllm", flush=True)
    if mode == "die":
        print("ERROR CUDA out of memory: tried to allocate 20.00 GiB", flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(3600)
    if mode == "orphan":  # as a crashed vLLM whose GPU worker lives on in its process group
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        with open(sys.argv[2], "w") as f:
            f.write(str(worker.pid))
        sys.exit(1)
    port, delay = int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    time.sleep(delay)
    print("INFO Application startup complete.", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()


if __name__ == "__main__":
    main()
