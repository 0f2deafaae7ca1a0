"""The HTTP API of ``pe-triage serve`` (FastAPI; MLflow 3's own scoring-server stack).

* ``GET /ping``: 200 while the process is up (liveness).
* ``GET /health``: 200 once a model is loaded and warmed, else 503 with ``{"status", "reason"}``.
* ``GET /version``: model name, registered version, alias, package version, device.
* ``POST /invocations``: MLflow's scoring protocol (JSON ``dataframe_split`` / ``dataframe_records``,
  parsed by MLflow's own helpers against the pyfunc's signature): HU slice rows, or ``dicom_path``
  rows read only under ``serve.allowed_prefixes``; answers ``{"predictions": [...]}``.
* ``POST /v1/triage``: one study's DICOM files as ``multipart/form-data`` (one file per part) or one
  ``application/dicom`` body; the ingest, quarantine and preprocessing of ``pe-triage predict``;
  answers its report (ordinal study and series names, no UID or patient field) with the model's
  name and version and ``timings``.

Limits (``ServeConfig``): body over ``max_body_mb`` -> 413, more than ``max_slices`` files or rows ->
413, more than ``max_concurrency`` requests running the model -> 503 with Retry-After. Every error is
JSON ``{"error_code", "message"}``; no message repeats request content, and the one log line per
request holds method, route, status, slices and milliseconds only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import _split_data_and_params, infer_and_parse_data, predictions_to_json
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pe_triage import __version__
from pe_triage.config import Config, IngestConfig, MonitorConfig, ServeConfig
from pe_triage.monitoring import record_frame, record_triage
from pe_triage.predict import InputNotAllowed, PredictError, triage_report
from pe_triage.registry.pyfunc import SIGNATURE, predict_frame
from pe_triage.registry.serve import ModelHolder, Served

log = logging.getLogger("pe_triage.serve")
_CHUNK = 1 << 20
#: the paths a log line may name before routing (a 413 by Content-Length); any other path could be anything
_ROUTES = ("/ping", "/health", "/version", "/invocations", "/v1/triage")


class ServeError(Exception):
    """A request refused with an HTTP status, a stable ``error_code`` and a message free of request content."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error_code": self.code, "message": self.message}, self.status, headers=self.headers)


class _Guard:
    """Pure ASGI middleware: refuses a body over the limit (by Content-Length, or while it streams in)
    and logs one line per request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> ServeError:
        return ServeError(413, "body_too_large", f"the request body is over {self.max_bytes >> 20} MiB (serve.max_body_mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, seen = time.perf_counter(), [500], [0]

        async def counted() -> Message:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.max_bytes:
                raise self._too_large()
            return message

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._too_large().response()(scope, receive, sent)
            else:
                await self.app(scope, counted, sent)
        finally:
            route = getattr(scope.get("route"), "path", None) or (scope["path"] if scope["path"] in _ROUTES else "(no route)")
            log.info("%s %s %d slices=%s %.0f ms", scope["method"], route, status[0],
                     scope.get("state", {}).get("slices", "-"), 1000 * (time.perf_counter() - start))


class _Slots:
    """At most ``n`` requests running the model; used from the event loop only, so a plain counter."""

    def __init__(self, n: int, retry_after_s: int) -> None:
        self.n, self.free, self.retry_after_s = n, n, retry_after_s

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.free <= 0:
            raise ServeError(503, "busy", f"{self.n} request(s) already running the model (serve.max_concurrency): "
                             "retry later", {"Retry-After": str(self.retry_after_s)})
        self.free -= 1
        try:
            yield
        finally:
            self.free += 1


async def _answer(work: Callable[[], Awaitable[Response]]) -> Response:
    """Run a route: ServeError -> its JSON; anything else -> 500 and the stack in the log, without the
    exception's message (it might quote the input)."""
    try:
        return await work()
    except ServeError as e:
        return e.response()
    except Exception as e:
        log.error("unexpected %s:\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__)))
        return ServeError(500, "internal_error", f"the server failed on this request ({type(e).__name__}); "
                          "its log has the stack").response()


def _served(holder: ModelHolder, retry_after_s: int) -> Served:
    served = holder.current
    if served is None:
        raise ServeError(503, "not_ready", holder.reason, {"Retry-After": str(retry_after_s)})
    return served


async def _predict(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The blocking model call in a worker thread; the library's refusals as 4xx with their message."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except InputNotAllowed as e:
        raise ServeError(403, "input_not_allowed", str(e)) from None
    except PredictError as e:
        raise ServeError(400, "bad_input", str(e)) from None
    except FileNotFoundError:
        raise ServeError(400, "bad_input", "an input names no file, folder or prefix") from None


def _model_info(holder: ModelHolder, served: Served | None) -> dict[str, Any]:
    return {"model_name": served.name if served else holder.name, "model_version": served.version if served else None,
            "alias": holder.alias, "package_version": __version__, "device": holder.device}


def create_app(holder: ModelHolder, config: ServeConfig, ingest: IngestConfig,
               monitor: MonitorConfig = MonitorConfig()) -> FastAPI:
    """The service's ASGI app; ``holder`` is refreshed by its owner (:func:`pe_triage.registry.serve.run`)."""
    app = FastAPI(title="pe-triage", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    slots = _Slots(config.max_concurrency, config.retry_after_s)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:  # 404, 405: Starlette's own words
        return ServeError(e.status_code, "http_error", str(e.detail)).response()

    @app.get("/ping")
    async def ping() -> Response:
        return JSONResponse({"status": "alive"})

    @app.get("/health")
    async def health() -> Response:
        if holder.current is None:
            return JSONResponse({"status": "not_ready", "reason": holder.reason}, 503)
        return JSONResponse({"status": "ready", "model_version": holder.current.version})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse(_model_info(holder, holder.current))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        async def work() -> Response:
            with slots.take():
                served = _served(holder, config.retry_after_s)
                frame = _parse_scoring_input(await request.body(), request.headers.get("content-type", ""))
                request.state.slices = len(frame)
                if len(frame) > config.max_slices:
                    raise ServeError(413, "too_many_slices", f"{len(frame)} rows, at most {config.max_slices} "
                                     "per request (serve.max_slices)")
                out = await _predict(predict_frame, served.triage, frame, config.allowed_prefixes)
            record_frame(monitor, out, served.triage, model=served.name or "local", version=served.version, source="invocations")
            text = StringIO()
            predictions_to_json(out, text)
            return Response(text.getvalue(), media_type="application/json")
        return await _answer(work)

    @app.post("/v1/triage")
    async def triage(request: Request) -> Response:
        return await _answer(lambda: _triage(request, holder, slots, config, ingest, monitor))

    app.add_middleware(_Guard, max_bytes=config.max_body_mb << 20)
    return app


def _parse_scoring_input(body: bytes, content_type: str) -> pd.DataFrame:
    """MLflow's JSON scoring input -> a DataFrame typed by the pyfunc's signature (binary columns
    base64-decoded) by MLflow's own parser; its error messages may quote the input, so ours do not."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ServeError(415, "unsupported_media_type", "/invocations takes application/json "
                         "(dataframe_split or dataframe_records, MLflow's scoring protocol)")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ServeError(400, "bad_json", "the body is not valid UTF-8 JSON") from None
    if not isinstance(payload, dict):
        raise ServeError(400, "bad_json", "the body must be a JSON object with dataframe_split or dataframe_records")
    try:
        data, _ = _split_data_and_params(payload)
        frame = infer_and_parse_data(data, SIGNATURE.inputs)
    except (MlflowException, ValueError, TypeError, KeyError):
        raise ServeError(400, "bad_input", "the body is not MLflow scoring input for this model: one of "
                         "dataframe_split or dataframe_records with the signature's columns (hu base64)") from None
    if not isinstance(frame, pd.DataFrame):
        raise ServeError(400, "bad_input", "give dataframe_split or dataframe_records")
    return frame


async def _triage(request: Request, holder: ModelHolder, slots: _Slots, config: ServeConfig,
                  ingest: IngestConfig, monitor: MonitorConfig) -> Response:
    """``POST /v1/triage``: the DICOM files into a private temporary folder (mode 0700, removed at the
    end whatever happens), then ``Triage.predict_dicom`` on it."""
    start = time.perf_counter()
    with slots.take():
        served = _served(holder, config.retry_after_s)
        with tempfile.TemporaryDirectory(prefix="pe-triage-serve-") as tmp:
            files = await _receive_dicom(request, Path(tmp), config.max_slices)
            request.state.slices = files
            received, steps = time.perf_counter(), dict[str, float]()
            per_slice, summary = await _predict(served.triage.predict_dicom, [tmp], ingest=ingest,
                                                allowed_prefixes=(tmp,), timings=steps)
        predicted = time.perf_counter()
    report = triage_report(per_slice, served.triage, model=f"models:/{served.name}/{served.version}" if served.name else "local",
                           input_summary=summary)
    report |= {"model_name": served.name, "model_version": served.version, "alias": holder.alias}
    record_triage(monitor, report, source="serve")
    # receive: body in and files written; decode/crop/model: predict_dicom's steps; predict: all of it
    # (with the temporary folder's removal); report: building this answer (its JSON encoding is not counted)
    ms = {"receive": received - start, **steps, "predict": predicted - received, "report": time.perf_counter() - predicted}
    report["timings_ms"] = {k: round(1000 * v) for k, v in ms.items()} | {"total": round(1000 * (time.perf_counter() - start))}
    return JSONResponse(report)


async def _receive_dicom(request: Request, folder: Path, max_slices: int) -> int:
    """Write the request's DICOM files into ``folder`` as ``000000.dcm``, ...; their number."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/dicom":
        with open(folder / "000000.dcm", "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
        return 1
    if kind != "multipart/form-data":
        raise ServeError(415, "unsupported_media_type", "/v1/triage takes multipart/form-data (one DICOM file per "
                         "part) or one application/dicom body")
    try:
        form = await request.form(max_files=max_slices, max_fields=0)
    except HTTPException as e:
        if "Too many files" in str(e.detail):
            raise ServeError(413, "too_many_slices", f"more than {max_slices} files in one request (serve.max_slices)") from None
        raise ServeError(400, "bad_multipart", "the multipart body could not be parsed: every part must be a "
                         "DICOM file sent with a filename (curl -F 'file=@x.dcm')") from None
    try:
        parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not parts:
            raise ServeError(400, "no_files", "the request holds no files (send each DICOM file as a part with a filename)")
        for n, part in enumerate(parts):
            with open(folder / f"{n:06d}.dcm", "wb") as f:
                while chunk := await part.read(_CHUNK):
                    f.write(chunk)
        return len(parts)
    finally:
        await form.close()


def run(model_uri: str, config: Config, *, host: str, port: int | None = None, tracking_uri: str | None = None,
        device: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM: the poller thread, SIGHUP -> reload check, uvicorn."""
    import uvicorn

    holder = ModelHolder(model_uri, tracking_uri=tracking_uri, registry=config.registry, device=device)
    stop = threading.Event()
    holder.start(stop, config.serve.reload_poll_s)
    app = create_app(holder, config.serve, config.ingest, config.monitor)
    log.info("pe-triage serve on %s:%d, model %s, device %s", host, port or config.serve.port, model_uri, holder.device)
    try:
        # no access log: it prints raw paths and query strings; the app logs one PHI-free line per request
        uvicorn.run(app, host=host, port=port or config.serve.port, access_log=False, log_config=None)
    finally:
        stop.set()
        holder.wake.set()
