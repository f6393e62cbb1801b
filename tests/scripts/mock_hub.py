"""A mock of the Hugging Face hub's download endpoints on loopback, for the `-hf` tests (tests/cli.rs).

Usage: mock_hub.py DIR LOG [--token T] [--cut-after N] [--corrupt]

Serves the files DIR/OWNER/REPO/FILE as the hub does (what the `hf-hub` crate asks for):
  GET /api/models/OWNER/REPO[/revision/main] -> {"sha": COMMIT, "siblings": [{"rfilename": FILE}, ...]}
  GET /OWNER/REPO/resolve/main/FILE     -> 206 for `Range: bytes=A-` or `bytes=A-B` (Content-Range, ETag = the
                                           file's SHA-256 as for an LFS file, X-Repo-Commit), 200 without Range
Prints "listening on http://127.0.0.1:PORT" first. Each request is a line of LOG: "METHOD PATH RANGE AUTH".
--token T: requests without "Authorization: Bearer T" get 401.
--cut-after N: the first download of more than one byte sends its headers, N bytes, and closes the connection.
--corrupt: serves the files with one byte flipped (their SHA-256 then differs from the ETag).
"""
import argparse
import hashlib
import http.server
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("log")
p.add_argument("--token")
p.add_argument("--cut-after", type=int)
p.add_argument("--corrupt", action="store_true")
args = p.parse_args()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
state = {"cut": args.cut_after}


class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle(self):
        try:
            super().handle()
        except ConnectionResetError:  # a client that closed a kept-alive connection
            pass

    def fail(self, status, message):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        rng, auth = self.headers.get("Range", "-"), self.headers.get("Authorization", "-")
        with open(args.log, "a") as log:
            log.write(f"GET {self.path} {rng} {auth}\n")
        if args.token and auth != f"Bearer {args.token}":
            return self.fail(401, "Invalid credentials")
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and (len(parts) == 4 or parts[4:] == ["revision", "main"]):
            repo = os.path.join(args.dir, parts[2], parts[3])
            if not os.path.isdir(repo):
                return self.fail(404, "Repository not found")
            files = sorted(os.listdir(repo))
            return self.send_json({"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT,
                                   "siblings": [{"rfilename": f} for f in files]})
        if len(parts) >= 5 and parts[2:4] == ["resolve", "main"]:
            path = os.path.join(args.dir, parts[0], parts[1], *parts[4:])
            if not os.path.isfile(path):
                return self.fail(404, "Entry not found")
            return self.send_file(path, rng)
        self.fail(404, "no such endpoint")

    def send_json(self, value):
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, path, rng):
        data = open(path, "rb").read()
        sha = hashlib.sha256(data).hexdigest()
        if args.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        start, end = 0, len(data) - 1
        if rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start, end = int(a), int(b) if b else len(data) - 1
        self.send_response(206 if rng != "-" else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        chunk = data[start:end + 1]
        if state["cut"] is not None and len(chunk) > 1:
            n, state["cut"] = state["cut"], None
            self.wfile.write(chunk[:n])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(chunk)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
