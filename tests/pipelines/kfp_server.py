"""A tiny KFP v2beta1 REST server for the submit/schedule tests (no real KFP can run here): a real
HTTP server on loopback that ``kfp.Client`` talks to over the wire, keeping pipelines, versions,
experiments, runs and recurring runs in memory. Like KFP, it refuses a second version of the same
name in one pipeline (409)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


class KfpState:
    def __init__(self) -> None:
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.packages: dict[str, bytes] = {}  # version id -> uploaded YAML
        self.experiments: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.recurring: dict[str, dict[str, Any]] = {}
        self.uploads = 0
        self.log: list[str] = []  # recurring-run calls in order


def _named(items: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Items matching the display_name EQUALS predicate of the request's filter (all without one)."""
    if "filter" not in query:
        return items
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    name = predicate.get("string_value", predicate.get("stringValue"))
    return [i for i in items if i["display_name"] == name]


def _upload(body: bytes, content_type: str) -> bytes:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
    return bytes(part.get_payload(decode=True))


class _Handler(BaseHTTPRequestHandler):
    state: KfpState

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        url, s = urlparse(self.path), self.state
        query = parse_qs(url.query)
        if url.path == f"{API}/healthz":
            return self._reply({"multi_user": False})
        if url.path == f"{API}/pipelines":  # shared pipelines, or those of the namespace asked for
            ns = query.get("namespace", [None])[0]
            return self._reply({"pipelines": _named([p for p in s.pipelines.values() if p.get("namespace") == ns], query)})
        if m := re.fullmatch(f"{API}/pipelines/([^/]+)/versions", url.path):
            return self._reply({"pipeline_versions": _named(s.versions[m[1]], query)})
        if url.path == f"{API}/experiments":
            return self._reply({"experiments": _named(s.experiments, query)})
        if url.path == f"{API}/recurringruns":
            return self._reply({"recurringRuns": _named(list(s.recurring.values()), query)})
        self._reply({"error": "not found"}, 404)

    def do_POST(self) -> None:
        url, s = urlparse(self.path), self.state
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
            package = _upload(self._body(), self.headers["Content-Type"])
            pipeline_id = query.get("pipelineid") or str(uuid.uuid4())
            if url.path.endswith("/upload"):
                s.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, "display_name": query["name"],
                                            "namespace": query.get("namespace")}
                s.versions[pipeline_id] = []
            if any(v["display_name"] == query["name"] for v in s.versions[pipeline_id]):
                return self._reply({"error": f"version {query['name']} exists"}, 409)
            version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": query["name"]}
            s.versions[pipeline_id].append(version)
            s.packages[version["pipeline_version_id"]] = package
            s.uploads += 1
            return self._reply(s.pipelines[pipeline_id] if url.path.endswith("/upload") else version)
        body = json.loads(self._body() or b"{}")
        if url.path == f"{API}/experiments":
            s.experiments.append(body | {"experiment_id": str(uuid.uuid4())})
            return self._reply(s.experiments[-1])
        if url.path == f"{API}/runs":
            s.runs.append(body | {"run_id": str(uuid.uuid4())})
            return self._reply(s.runs[-1])
        if url.path == f"{API}/recurringruns":
            run = body | {"recurring_run_id": str(uuid.uuid4())}
            s.recurring[run["recurring_run_id"]] = run
            s.log.append(f"create {run['recurring_run_id']}")
            return self._reply(run)
        self._reply({"error": "not found"}, 404)

    def do_DELETE(self) -> None:
        if m := re.fullmatch(f"{API}/recurringruns/([^/]+)", urlparse(self.path).path):
            self.state.recurring.pop(m[1])
            self.state.log.append(f"delete {m[1]}")
            return self._reply({})
        self._reply({"error": "not found"}, 404)


class KfpServer:
    """``with KfpServer() as kfp:`` — ``kfp.host`` for ``kfp.Client``, ``kfp.state`` to inspect."""

    def __init__(self) -> None:
        self.state = KfpState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KfpServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
