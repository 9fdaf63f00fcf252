"""A webhook receiver for the tests: answers 500 to the first FAIL_FIRST requests, then 200,
and appends every request (headers and body) it accepted or refused to OUTFILE as JSON lines.

Usage: hook_receiver.py PORT OUTFILE FAIL_FIRST. Prints "ready" once it listens.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, outfile, fail_first = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lock = threading.Lock()
seen = {"n": 0}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        with lock:
            seen["n"] += 1
            status = 500 if seen["n"] <= fail_first else 200
            with open(outfile, "a") as f:
                f.write(json.dumps({"status": status, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
