"""Drives the real Hugging Face client against a weightgate server for tests/hub.rs.

Usage: client.py COMMAND JSON_ARGS. HF_ENDPOINT, HF_TOKEN and HF_HOME come from the
environment. Prints one JSON object: what happened, for the Rust test to assert on.
"""
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading

from huggingface_hub import HfApi, hf_hub_download, snapshot_download

HF = os.path.join(os.path.dirname(sys.executable), "hf")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root, files):
    return {p: (sha256(os.path.join(root, p)) if os.path.exists(os.path.join(root, p)) else None) for p in files}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def download(a):
    repo, files, commit = a["repo"], a["files"], a["commit"]
    warnings = Warnings()
    logging.getLogger("huggingface_hub").addHandler(warnings)
    out = {}
    nested = a["nested"]
    p = hf_hub_download(repo, nested)
    out["hf_hub_download"] = sha256(p)
    out["hf_hub_download_path"] = p
    snap = snapshot_download(repo)
    out["snapshot_main"] = {"path": snap, "hashes": tree_hashes(snap, files)}
    snap = snapshot_download(repo, revision=commit)
    out["snapshot_commit"] = {"path": snap, "hashes": tree_hashes(snap, files)}
    d = os.path.join(a["work"], "cli-all")
    r = subprocess.run([HF, "download", repo, "--local-dir", d], capture_output=True, text=True)
    out["cli_all"] = {"code": r.returncode, "hashes": tree_hashes(d, files), "stderr": r.stderr[-2000:]}
    d = os.path.join(a["work"], "cli-one")
    r = subprocess.run([HF, "download", repo, nested, "--local-dir", d], capture_output=True, text=True)
    out["cli_one"] = {"code": r.returncode, "hashes": tree_hashes(d, [nested]), "stderr": r.stderr[-2000:]}
    out["warnings"] = warnings.seen
    return out


def cached(a):
    snap = snapshot_download(a["repo"])
    return {"path": snap, "hashes": tree_hashes(snap, a["files"])}


def verify(a):
    r = subprocess.run([HF, "cache", "verify", a["repo"]], capture_output=True, text=True)
    return {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def error(a):
    out = {}
    try:
        hf_hub_download(a["repo"], a["filename"], revision=a.get("revision", "main"))
        out["class"] = None
    except Exception as e:  # the test asserts on the class and message
        out["class"] = type(e).__name__
        out["message"] = str(e)
        out["server_message"] = getattr(e, "server_message", None)
    r = subprocess.run([HF, "download", a["repo"], a["filename"]], capture_output=True, text=True)
    out["cli_code"] = r.returncode
    out["cli_stderr"] = r.stderr[-2000:]
    return out


def jsonable(v):
    if dataclasses.is_dataclass(v):
        return {k: jsonable(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    return v


def api(a):
    hf = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=a.get("token") or os.environ.get("HF_TOKEN"))
    try:
        result = getattr(hf, a["method"])(*a.get("args", []), **a.get("kwargs", {}))
        if hasattr(result, "__iter__") and not isinstance(result, (dict, str, list)):
            result = list(result)
        return {"ok": True, "result": jsonable(result)}
    except Exception as e:
        return {"ok": False, "class": type(e).__name__, "message": str(e), "status": getattr(getattr(e, "response", None), "status_code", None)}


def resume(a):
    """A proxy that cuts the first file transfer after `cut_at` bytes of body, so the client
    must resume with a Range request."""
    upstream = a["upstream"]
    host, port = upstream.split(":")
    state = {"cut": False, "ranges": [], "gets": 0}
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    def serve(client):
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
            is_get = lines[0].startswith(b"GET ") and b"/resolve/" in lines[0]
            for l in lines:
                if l.lower().startswith(b"range:"):
                    state["ranges"].append(l.split(b":", 1)[1].strip().decode())
            lines.append(b"Connection: close")
            up = socket.create_connection((host, int(port)))
            up.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
            cut_here = is_get and not state["cut"]
            if is_get:
                state["gets"] += 1
            sent_body = None
            buf = b""
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                if cut_here:
                    if sent_body is None:
                        buf += chunk
                        if b"\r\n\r\n" in buf:
                            h, body = buf.split(b"\r\n\r\n", 1)
                            client.sendall(h + b"\r\n\r\n")
                            sent_body = 0
                            chunk = body
                        else:
                            continue
                    room = a["cut_at"] - sent_body
                    if len(chunk) >= room:
                        client.sendall(chunk[:room])
                        state["cut"] = True
                        break
                    client.sendall(chunk)
                    sent_body += len(chunk)
                else:
                    client.sendall(chunk)
            up.close()
        finally:
            client.close()

    def accept():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:%d" % lsock.getsockname()[1]
    import huggingface_hub.constants as c
    c.ENDPOINT = os.environ["HF_ENDPOINT"]
    c.HUGGINGFACE_CO_URL_TEMPLATE = c.ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
    p = hf_hub_download(a["repo"], a["filename"], endpoint=os.environ["HF_ENDPOINT"])
    lsock.close()
    return {"sha256": sha256(p), "cut": state["cut"], "ranges": state["ranges"], "gets": state["gets"]}


if __name__ == "__main__":
    command, args = sys.argv[1], json.loads(sys.argv[2])
    result = {"download": download, "cached": cached, "verify": verify, "error": error, "api": api, "resume": resume}[command](args)
    print(json.dumps(result))
