"""The HTTP service: a Classifier behind FastAPI, with an upload page, strict upload limits and batching.

Every request that cannot be served is the client's fault and gets a 4xx with a JSON body
``{"error": code, "detail": message}``: too large (413), not an allowed image format (415),
truncated or corrupt (422), missing or misnamed field and empty uploads (400). Decoding runs on a
small thread pool and the model on one inference thread that batches whatever requests are waiting,
so the event loop never blocks and concurrent uploads share one forward pass.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batched_inference import softmax
from .data.images import open_rgb
from .errors import ConfigError, ImageReadError, RunFolderError
from .inference.classifier import Classifier
from .rejection import UNKNOWN, split_output
from .run_folder import RunFolder
from .settings import setting

MB = 1024 * 1024
# (signature offset, bytes, format); WEBP also needs "WEBP" at offset 8, checked in sniff_format.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
)
STATIC_DIR = files("resfit") / "static"
UPLOAD_FIELDS = ("file", "files")


def megabytes(text: str) -> int:
    """--max-upload-mb's value in bytes."""
    return int(float(text) * MB)


@dataclass(frozen=True)
class ServeConfig:
    """Limits and defaults of the service; the CLI's flags build this."""

    max_upload_bytes: int = setting(  # the whole request body
        10 * MB,
        names=("--max-upload-mb",),
        parse=megabytes,
        metavar="MB",
        help="largest request body accepted",
    )
    max_pixels: int = setting(  # per image, checked from the header before decoding
        40_000_000, help="largest image accepted (decompression-bomb guard)"
    )
    max_files: int = 16  # images in one request
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    top_k: int = setting(5, help="classes returned when the request does not say")
    max_batch: int = 16  # images the inference thread runs in one call
    decode_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_files", "top_k", "max_batch", "decode_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {name} must be at least 1, got {getattr(self, name)}")


class UploadRejected(Exception):
    """A request the service will not serve: becomes a 4xx JSON error."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's first bytes (never by its name or declared type)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for offset, signature, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def decode_upload(filename: str, data: bytes, config: ServeConfig):
    """RGB image and conversion notes, or UploadRejected with the status that fits the problem."""
    if not data:
        raise UploadRejected(400, "empty_file", f"{filename}: the upload is empty (0 bytes)")
    image_format = sniff_format(data)
    allowed = ", ".join(config.allowed_formats)
    if image_format is None:
        raise UploadRejected(
            415, "unsupported_format", f"{filename}: not an image in an allowed format ({allowed})"
        )
    if image_format not in config.allowed_formats:
        raise UploadRejected(
            415, "unsupported_format", f"{filename}: {image_format} is not allowed ({allowed})"
        )
    try:
        return open_rgb(data, max_pixels=config.max_pixels)
    except ImageReadError as error:
        status, code = _status_for(error.reason)
        raise UploadRejected(status, code, f"{filename}: {error.reason}") from None
    except Exception as error:  # a decoder failure open_rgb did not foresee is still the file's fault
        raise UploadRejected(422, "corrupt_image", f"{filename}: cannot decode ({error})") from None


def _status_for(reason: str) -> tuple[int, str]:
    if reason.startswith("too large"):
        return 413, "too_many_pixels"
    if reason.startswith(("not an image", "unsupported")):
        return 415, "unsupported_format"
    if reason.startswith("empty"):
        return 400, "empty_file"
    return 422, "corrupt_image"


class Batcher:
    """One inference thread; requests that arrive while it is busy are run together as one batch."""

    def __init__(self, run_batch, max_batch: int):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resfit-infer")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        self.executor.shutdown(wait=True)

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.task is None:  # no lifespan (an app driven without startup): run it directly
            return await loop.run_in_executor(self.executor, self.run_batch, batch)
        future = loop.create_future()
        await self.queue.put((batch, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            size = len(waiting[0][0])
            while size < self.max_batch and not self.queue.empty():
                waiting.append(self.queue.get_nowait())
                size += len(waiting[-1][0])
            try:
                batch = np.concatenate([images for images, _ in waiting])
                logits = await loop.run_in_executor(self.executor, self.run_batch, batch)
            except Exception as error:  # handed to each waiting request, which reports it
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for images, future in waiting:
                if not future.done():
                    future.set_result(logits[start : start + len(images)])
                start += len(images)


class BodySizeLimit:
    """ASGI middleware: a body over the limit gets 413 before any parsing, whatever Content-Length says.

    A declared Content-Length over the limit is answered at once, without reading the body (which may
    never come). A body that turns out too large as it streams is read and dropped up to a cap, so that
    the client, still sending, receives the 413 instead of a reset connection.
    """

    def __init__(self, app, max_bytes: int, drain_cap: int = 128 * MB):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_cap = drain_cap

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send, None)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, received: int | None) -> None:
        """413; ``received`` is how much of the body was read (None: nothing is, it was declared too large)."""
        more = received is not None
        while more and received <= self.drain_cap:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        detail = f"the request body exceeds the upload limit of {self.max_bytes:,} bytes"
        response = JSONResponse({"error": "upload_too_large", "detail": detail}, status_code=413)
        await response(scope, receive, send)


class HeadAsGet:
    """ASGI middleware: HEAD on any GET route (health checks, the page, /docs) answers as GET, without the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return None
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        return await self.app(dict(scope, method="GET"), receive, headers_only)


def create_app(classifier: Classifier, config: ServeConfig | None = None) -> FastAPI:
    """The service for one Classifier; everything it needs lives on the app (no module state)."""
    config = config or ServeConfig()
    decoder = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="resfit-decode")
    # logits, and features for a knn rule; the engine is looked up per batch: int8 may replace it
    batcher = Batcher(lambda batch: classifier.backend(batch), config.max_batch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        if classifier.int8_pending:  # answer now on fp32; int8 joins once quantized and checked
            threading.Thread(
                target=_int8_in_background, args=(classifier,), name="resfit-int8", daemon=True
            ).start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=True)

    app = FastAPI(
        title="resfit",
        summary=f"{classifier.meta['architecture']} classifying {', '.join(classifier.class_names)}",
        version=str(classifier.meta.get("versions", {}).get("resfit", "")),
        lifespan=lifespan,
    )
    app.state.classifier = classifier
    app.state.config = config
    app.add_middleware(BodySizeLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(HeadAsGet)
    _add_error_handlers(app)
    model_info = _model_info(classifier, config)

    @app.get("/health", summary="liveness and the backend in use")
    async def health() -> dict:
        return {"status": "ok", "backend": classifier.choice.name, "precision": classifier.choice.precision}

    @app.get("/model", summary="classes, architecture, preprocessing, metrics and upload limits")
    async def model() -> dict:
        return model_info

    @app.post(
        "/predict",
        summary="classify one image (field `file`) or several (field `files`)",
        openapi_extra={"requestBody": _upload_schema(config)},
        responses={400: {}, 413: {}, 415: {}, 422: {}},
    )
    async def predict(request: Request, top_k: int = Query(config.top_k, ge=1, le=1000)) -> dict:
        single, uploads = await _read_uploads(request, config)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(decoder, decode_upload, name, data, config) for name, data in uploads),
            return_exceptions=True,
        )
        for outcome in decoded:
            if isinstance(outcome, BaseException):
                raise outcome
        batch = await loop.run_in_executor(decoder, classifier.preprocess, [image for image, _ in decoded])
        logits, features = split_output(await batcher.submit(batch), len(classifier.class_names))
        probs = softmax(logits)
        seconds = round(time.perf_counter() - started, 4)
        results = []
        for (name, _), (_, notes), row, answer in zip(
            uploads, decoded, probs, classifier.answers(logits, features), strict=True
        ):
            best = classifier.class_names[int(np.argmax(row))]
            unknown = answer is not None and answer.unknown
            results.append(
                {
                    "filename": name,
                    "predicted": UNKNOWN if unknown else best,
                    **(answer.to_dict(best) if answer is not None else {}),
                    "top_k": [
                        {"class": c, "probability": round(p, 6)} for c, p in classifier.top_k(row, top_k)
                    ],
                    "notes": notes,
                }
            )
        if single:
            return results[0] | {"seconds": seconds}
        return {"results": results, "seconds": seconds}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app


async def _read_uploads(request: Request, config: ServeConfig) -> tuple[bool, list[tuple[str, bytes]]]:
    """(whether the single-file field was used, [(filename, bytes)]) from a multipart form."""
    content_type = request.headers.get("content-type", "")
    hint = "send multipart/form-data with the image in the field 'file' (or several in 'files')"
    if not content_type.startswith("multipart/form-data"):
        if not await request.body():
            raise UploadRejected(400, "empty_body", f"the request has no body: {hint}")
        raise UploadRejected(415, "not_multipart", f"Content-Type is {content_type or 'missing'}: {hint}")
    try:
        form = await request.form(max_files=config.max_files, max_fields=config.max_files + 8)
    except Exception as error:  # python-multipart's and Starlette's parse errors, whatever their type
        if "Too many files" in str(error):
            raise UploadRejected(
                413, "too_many_files", f"at most {config.max_files} images per request"
            ) from None
        raise UploadRejected(
            400, "bad_multipart", f"the multipart body cannot be parsed ({error}): {hint}"
        ) from None
    try:
        singles = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
        many = [v for v in form.getlist("files") if isinstance(v, UploadFile)]
        if len(singles) > 1:
            raise UploadRejected(400, "too_many_files", "one image per 'file' field: send several in 'files'")
        uploads = singles + many
        if not uploads:
            sent = ", ".join(sorted(set(form.keys()))) or "none"
            raise UploadRejected(
                400, "missing_file", f"no image in the field 'file' or 'files' (fields sent: {sent}): {hint}"
            )
        if len(uploads) > config.max_files:
            raise UploadRejected(
                413, "too_many_files", f"{len(uploads)} images sent, at most {config.max_files}"
            )
        return bool(singles) and not many, [(u.filename or "upload", await u.read()) for u in uploads]
    finally:
        await form.close()


def _upload_schema(config: ServeConfig) -> dict:
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": binary | {"description": "one image"},
                        "files": {
                            "type": "array",
                            "items": binary,
                            "description": f"up to {config.max_files} images",
                        },
                    },
                }
            }
        },
        "description": (
            f"{', '.join(config.allowed_formats)}; at most {config.max_upload_bytes:,} bytes in all "
            f"and {config.max_pixels:,} pixels per image"
        ),
    }


def _model_info(classifier: Classifier, config: ServeConfig) -> dict:
    meta = classifier.meta
    info = {
        "architecture": meta["architecture"],
        "class_names": classifier.class_names,
        "num_classes": len(classifier.class_names),
        "preprocessing": meta["preprocessing"],
        "temperature": float(meta.get("temperature", 1.0)),  # already applied: probabilities are calibrated
        # the "unknown" rule the service applies (None: it always names a class)
        "reject": classifier.reject.to_dict() if classifier.reject else None,
        "backend": {
            "name": classifier.choice.name,
            "precision": classifier.choice.precision,
            "reason": classifier.choice.reason,
        },
        "limits": asdict(config) | {"allowed_formats": list(config.allowed_formats)},
        "metrics": None,
    }
    folder = RunFolder(classifier.run_dir) if classifier.run_dir else None
    if folder is not None and folder.metrics_file("val").is_file():
        try:
            info["metrics"] = folder.read_metrics("val")
        except RunFolderError:
            info["metrics"] = None  # a damaged report must not take the service down
    return info


def _error(status: int, code: str, detail) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadRejected)
    async def rejected(_request: Request, error: UploadRejected) -> JSONResponse:
        return _error(error.status, error.code, error.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, str(error.detail))


def _int8_in_background(classifier: Classifier) -> None:
    """serve's int8 step, off the request path: whatever goes wrong, the service stays on the engine it has."""

    def say(line: str) -> None:
        print(f"resfit: {line}", file=sys.stderr, flush=True)

    try:
        classifier.reach_int8_verdict(say)
    except Exception as error:  # a bug here must not take the service down with it
        say(f"staying on {classifier.choice.name} ({classifier.choice.precision}): int8 failed: {error}")


def run_server(
    classifier: Classifier, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None
) -> None:
    """Serve until interrupted (uvicorn, one process: the model already uses every core)."""
    import uvicorn

    uvicorn.run(create_app(classifier, config), host=host, port=port, log_level="info", access_log=False)


class BackgroundServer:
    """The service on a loopback port in a background thread: for tests, notebooks and the load benchmark.

    ``with BackgroundServer(app) as url: ...`` starts uvicorn on a free port and stops it on exit.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
