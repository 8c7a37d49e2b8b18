"""HTTP inference server with adapter hot swap and prediction events for the monitor.

``create_app`` builds a FastAPI app around a ``ModelHolder``. The holder polls a version
source and loads a new ``Classifier`` in a background thread whenever the active version
changes, then swaps one reference. A request reads that reference once, so it finishes on
the model it started with, and its response names the version that computed it.

The holder also keeps models warm, so that a swap does not load from disk while requests
wait: the candidates that wait for approval are loaded beforehand, and the versions it
replaced stay in memory for a rollback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from pydantic import BaseModel, Field

from monitor.auth import bearer_matches
from monitor.ingest import preview_value
from retrain.emitter import EventEmitter

if TYPE_CHECKING:
    from retrain.model import Classifier

logger = logging.getLogger(__name__)

# Returns the active (version, adapter_dir), or (version, adapter_dir, origin) where origin
# names the candidate the version was registered from (the retrain run id), or None.
VersionSource = Callable[[], "tuple[str, str] | tuple[str, str, str | None] | None"]
# Returns the candidates to load before they are approved, as (origin, adapter_dir), newest first.
CandidateSource = Callable[[], "list[tuple[str, str]]"]
Loader = Callable[[str, str, str], "Classifier"]

# A version that failed to load is retried by the poll thread after this many seconds, so a
# broken adapter does not log a traceback on every poll. /v1/admin/reload retries at once.
FAILED_LOAD_RETRY_S = 30.0

# Maximum length in characters of a rejected value as quoted in a 422 message.
VALUE_PREVIEW_CHARS = 60

# Maximum number of field errors listed in one 4xx response.
MAX_ERROR_MESSAGES = 20
NO_MODEL_MESSAGE = "no model loaded yet; the server is waiting for an active version"

# Label values of driftloop_server_requests_total.
OUTCOME_OK = "ok"
OUTCOME_INVALID = "invalid"
OUTCOME_UNAVAILABLE = "unavailable"
OUTCOME_ERROR = "error"
OUTCOMES = (OUTCOME_OK, OUTCOME_INVALID, OUTCOME_UNAVAILABLE, OUTCOME_ERROR)


class ClassifyRequest(BaseModel):
    """Body of POST /v1/classify, used for the OpenAPI schema. The handler validates by hand."""

    texts: list[str] = Field(description="Texts to classify, each non-empty after stripping.")
    return_probabilities: bool = Field(
        False, description="Also return the full probability vector and the label order."
    )


class PredictionFailedError(RuntimeError):
    """The model raised while classifying; ``version`` names it and ``__cause__`` is the error."""

    def __init__(self, version: str) -> None:
        super().__init__(f"prediction failed on version {version}")
        self.version = version


@dataclass(frozen=True)
class FieldError:
    """One problem in a request body: the field's path, its value and what is wrong with it."""

    field: str
    value: Any
    error: str

    def __str__(self) -> str:
        return f"{self.field}: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": preview_value(self.value), "error": self.error}


class InvalidRequestError(ValueError):
    """A request body failed validation; ``errors`` has one FieldError per problem."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


def error_body(errors: list[FieldError]) -> dict[str, Any]:
    """Build a 4xx body in the monitor's shape: one ``error`` message and the ``errors`` by field.

    At most MAX_ERROR_MESSAGES are listed, and the message counts the rest.
    """
    listed = errors[:MAX_ERROR_MESSAGES]
    message = "; ".join(map(str, listed))
    if len(errors) > len(listed):
        message += f"; ... and {len(errors) - len(listed)} more errors"
    return {"error": message, "errors": [error.to_dict() for error in listed]}


def _preview(value: Any) -> str:
    text = repr(value)
    if len(text) > VALUE_PREVIEW_CHARS:
        text = text[: VALUE_PREVIEW_CHARS - 3] + "..."
    return text


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_classify_request(
    body: Any, *, max_batch: int, max_text_chars: int
) -> tuple[list[str], bool]:
    """Validate a decoded /v1/classify body and return ``(texts, return_probabilities)``.

    Raises InvalidRequestError with one FieldError per problem, such as ``texts[3]: empty
    string ''`` or ``texts: 300 items, at most 256 allowed``. Texts are returned unchanged.
    Stripping only decides whether a text counts as empty.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError(
            [FieldError("body", body, f"expected a JSON object, got {_json_type_name(body)} {_preview(body)}")]
        )

    errors: list[FieldError] = []
    return_probabilities = body.get("return_probabilities", False)
    if not isinstance(return_probabilities, bool):
        errors.append(FieldError(
            "return_probabilities", return_probabilities,
            f"expected true or false, got {_json_type_name(return_probabilities)} {_preview(return_probabilities)}",
        ))

    if "texts" not in body:
        errors.append(FieldError("texts", None, "missing required field, expected a list of strings"))
        raise InvalidRequestError(errors)
    texts = body["texts"]
    if not isinstance(texts, list):
        errors.append(FieldError(
            "texts", texts, f"expected a list of strings, got {_json_type_name(texts)} {_preview(texts)}"
        ))
        raise InvalidRequestError(errors)
    if not texts:
        errors.append(FieldError("texts", texts, "empty list, at least 1 item required"))
        raise InvalidRequestError(errors)
    if len(texts) > max_batch:
        errors.append(FieldError("texts", f"{len(texts)} items", f"{len(texts)} items, at most {max_batch} allowed"))
        raise InvalidRequestError(errors)

    for index, text in enumerate(texts):
        field = f"texts[{index}]"
        if not isinstance(text, str):
            errors.append(FieldError(field, text, f"expected a string, got {_json_type_name(text)} {_preview(text)}"))
        elif not text.strip():
            errors.append(FieldError(field, text, f"empty string {_preview(text)}"))
        elif len(text) > max_text_chars:
            errors.append(FieldError(
                field, text, f"{len(text)} characters, at most {max_text_chars} allowed ({_preview(text)})"
            ))
    if errors:
        raise InvalidRequestError(errors)
    return texts, return_probabilities


@dataclass
class ServerMetrics:
    """Prometheus metrics of one app, registered on the app's registry."""

    requests: Counter
    latency: Histogram
    active_version: Info
    swaps: Counter
    load_failures: Counter
    preloads: Counter
    warm_models: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry) -> ServerMetrics:
        requests = Counter(
            "driftloop_server_requests_total",
            "Classify requests by outcome (ok, invalid, unavailable, error).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            requests.labels(outcome=outcome)
        preloads = Counter(
            "driftloop_server_preloads_total",
            "Candidates loaded into memory before approval, by outcome (loaded, failed).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("loaded", "failed"):
            preloads.labels(outcome=outcome)
        return cls(
            requests=requests,
            latency=Histogram(
                "driftloop_server_request_latency_seconds",
                "Handling time of successful classify requests, from body parsing to response.",
                registry=registry,
            ),
            active_version=Info(
                "driftloop_server_active_version",
                "Adapter version that serves requests.",
                registry=registry,
            ),
            swaps=Counter(
                "driftloop_server_swaps_total",
                "Model activations, including the first load.",
                registry=registry,
            ),
            load_failures=Counter(
                "driftloop_server_load_failures_total",
                "Failed version lookups and model loads. The previous model keeps serving.",
                registry=registry,
            ),
            preloads=preloads,
            warm_models=Gauge(
                "driftloop_server_warm_models",
                "Models held in memory besides the active one: preloaded candidates and replaced versions.",
                registry=registry,
            ),
        )


@dataclass
class RefreshOutcome:
    """Result of one ModelHolder.refresh call."""

    version: str | None
    changed: bool
    error: str | None = None


def _candidate_key(origin: str) -> str:
    return f"candidate:{origin}"


def _version_key(key: tuple[str, str]) -> str:
    return f"version:{key[0]}:{key[1]}"


class ModelHolder:
    """Active Classifier, the models kept warm, and the thread that polls and swaps.

    The new model is loaded completely before one attribute assignment activates it. That
    assignment is atomic in CPython, so readers see either the old or the new model.

    Warm models: up to ``preload_candidates`` of the newest candidates from
    ``candidate_source`` are loaded by the poll thread while they wait for approval, and up
    to ``keep_previous`` replaced versions stay loaded. Activating a warm model is one
    assignment, with no disk read or weight copy on the request path. Each warm model costs
    the memory of one copy of the base model.
    """

    def __init__(
        self,
        version_source: VersionSource,
        load: Callable[[str, str], Classifier],
        *,
        poll_interval_s: float,
        metrics: ServerMetrics,
        candidate_source: CandidateSource | None = None,
        preload_candidates: int = 1,
        keep_previous: int = 1,
    ) -> None:
        if preload_candidates < 0:
            raise ValueError(f"preload_candidates must be at least 0, got {preload_candidates}")
        if keep_previous < 0:
            raise ValueError(f"keep_previous must be at least 0, got {keep_previous}")
        self._version_source = version_source
        self._load = load
        self._poll_interval_s = poll_interval_s
        self._metrics = metrics
        self._candidate_source = candidate_source
        self._preload_candidates = preload_candidates
        self._keep_previous = keep_previous

        self._model: Classifier | None = None
        self._active_key: tuple[str, str] | None = None
        # Serializes refreshes from the poll thread and /v1/admin/reload, so that one
        # version is never loaded twice at the same time.
        self._refresh_lock = threading.Lock()
        self._failed_at: dict[tuple[str, str], float] = {}
        self._last_source_error: str | None = None
        self._warned_no_version = False

        # Warm models by key (_candidate_key or _version_key), oldest first, guarded by
        # _warm_lock. A preload runs under _preload_lock and names its key in _preloading, so
        # that a swap of that candidate waits for it instead of loading twice.
        self._warm: OrderedDict[str, Classifier] = OrderedDict()
        self._warm_lock = threading.Lock()
        self._preload_lock = threading.Lock()
        self._preloading: str | None = None
        self._preload_failed_at: dict[str, float] = {}
        self._last_candidate_error: str | None = None

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> Classifier | None:
        """Active model, or None before the first successful load."""
        return self._model

    def warm_versions(self) -> list[str]:
        """Keys of the models kept warm, oldest first, such as ``candidate:r1`` or ``version:v2:/dir``."""
        with self._warm_lock:
            return list(self._warm)

    def refresh(self, *, force: bool = False) -> RefreshOutcome:
        """Call the version source and load the version if it differs from the active one.

        A version whose load failed less than FAILED_LOAD_RETRY_S ago is skipped unless
        ``force`` is set. Source and load errors are logged, counted and returned in
        ``RefreshOutcome.error`` instead of raised, and the active model keeps serving. When
        the source returns None the active model also stays.
        """
        with self._refresh_lock:
            try:
                source = self._version_source()
            except Exception as exc:
                return self._record_source_error(exc)
            self._last_source_error = None

            if source is None:
                if self._model is not None and not self._warned_no_version:
                    logger.warning(
                        "version source returned no version, so version %s keeps serving",
                        self._model.version,
                    )
                    self._warned_no_version = True
                return RefreshOutcome(self._active_version(), changed=False)
            self._warned_no_version = False

            version, adapter_dir = str(source[0]), str(source[1])
            origin = source[2] if len(source) > 2 else None
            key = (version, adapter_dir)
            if key == self._active_key:
                return RefreshOutcome(self._active_version(), changed=False)

            failed_at = self._failed_at.get(key)
            if (
                not force
                and failed_at is not None
                and time.monotonic() - failed_at < FAILED_LOAD_RETRY_S
            ):
                return RefreshOutcome(self._active_version(), changed=False)

            return self._load_and_swap(version, adapter_dir, origin)

    def _take_warm(self, key: tuple[str, str], origin: str | None) -> tuple[Classifier | None, str]:
        """Remove and return the warm model for ``key``, or for the candidate ``origin``, with how it was found."""
        keys = [_version_key(key)]
        if origin is not None:
            keys.append(_candidate_key(origin))
            if self._preloading == keys[-1]:
                # The poll thread is loading this candidate now, so wait for it rather than load twice.
                with self._preload_lock:
                    pass
        with self._warm_lock:
            for warm_key in keys:
                model = self._warm.pop(warm_key, None)
                if model is not None:
                    self._metrics.warm_models.set(len(self._warm))
                    return model, warm_key.split(":", 1)[0]
        return None, "disk"

    def _retire(self, model: Classifier, key: tuple[str, str]) -> None:
        """Keep the replaced model warm for a rollback, dropping the oldest replaced ones over the limit."""
        with self._warm_lock:
            if self._keep_previous > 0:
                self._warm[_version_key(key)] = model
            retired = [name for name in self._warm if name.startswith("version:")]
            for name in retired[: max(0, len(retired) - self._keep_previous)]:
                del self._warm[name]
            self._metrics.warm_models.set(len(self._warm))

    def _load_and_swap(self, version: str, adapter_dir: str, origin: str | None) -> RefreshOutcome:
        previous = self._active_version()
        started = time.perf_counter()
        model, found = self._take_warm((version, adapter_dir), origin)
        if model is not None:
            # A preloaded candidate was loaded under its run id, and it serves under its version name.
            model.version = version
        else:
            logger.info(
                "loading version %s from %s (active: %s)", version, adapter_dir, previous
            )
            try:
                model = self._load(version, adapter_dir)
            except Exception as exc:
                self._failed_at[(version, adapter_dir)] = time.monotonic()
                self._metrics.load_failures.inc()
                logger.exception(
                    "loading version %s from %s failed, so version %s keeps serving",
                    version,
                    adapter_dir,
                    previous,
                )
                return RefreshOutcome(
                    previous,
                    changed=False,
                    error=f"loading version {version} from {adapter_dir} failed: "
                    f"{type(exc).__name__}: {exc}",
                )

        replaced, replaced_key = self._model, self._active_key
        self._model = model
        self._active_key = (version, adapter_dir)
        self._failed_at.pop((version, adapter_dir), None)
        if replaced is not None and replaced_key is not None:
            self._retire(replaced, replaced_key)
        self._metrics.swaps.inc()
        self._metrics.active_version.info({"version": model.version})
        logger.info(
            "version %s is active (previous: %s), from %s in %.3f s",
            model.version,
            previous,
            {"disk": "a load", "candidate": "the preloaded candidate", "version": "memory"}[found],
            time.perf_counter() - started,
        )
        return RefreshOutcome(model.version, changed=True)

    def preload(self) -> list[str]:
        """Load the newest waiting candidates that are not warm yet; return the keys loaded.

        Candidates that left the source are dropped from memory. A failed preload is logged
        and retried after FAILED_LOAD_RETRY_S; the swap then loads the version itself.
        """
        if self._candidate_source is None or self._preload_candidates == 0:
            return []
        try:
            candidates = list(self._candidate_source())[: self._preload_candidates]
        except Exception as exc:
            error = f"candidate source failed: {type(exc).__name__}: {exc}"
            if error != self._last_candidate_error:
                logger.warning("%s, so no candidate is preloaded", error)
                self._last_candidate_error = error
            return []
        self._last_candidate_error = None

        waiting = {_candidate_key(origin): str(adapter_dir) for origin, adapter_dir in candidates}
        with self._warm_lock:
            for name in [name for name in self._warm if name.startswith("candidate:") and name not in waiting]:
                del self._warm[name]
                logger.info("dropped preloaded %s: it no longer waits for approval", name)
            self._metrics.warm_models.set(len(self._warm))
            missing = [(name, path) for name, path in waiting.items() if name not in self._warm]

        loaded = []
        for name, adapter_dir in missing:
            failed_at = self._preload_failed_at.get(name)
            if failed_at is not None and time.monotonic() - failed_at < FAILED_LOAD_RETRY_S:
                continue
            with self._preload_lock:
                self._preloading = name
                try:
                    started = time.perf_counter()
                    model = self._load(name, adapter_dir)
                except Exception as exc:
                    self._preload_failed_at[name] = time.monotonic()
                    self._metrics.preloads.labels(outcome="failed").inc()
                    logger.warning("preloading %s from %s failed: %s: %s", name, adapter_dir, type(exc).__name__, exc)
                    continue
                finally:
                    self._preloading = None
            with self._warm_lock:
                self._warm[name] = model
                self._metrics.warm_models.set(len(self._warm))
            self._preload_failed_at.pop(name, None)
            self._metrics.preloads.labels(outcome="loaded").inc()
            loaded.append(name)
            logger.info("preloaded %s from %s in %.2f s", name, adapter_dir, time.perf_counter() - started)
        return loaded

    def _record_source_error(self, exc: Exception) -> RefreshOutcome:
        self._metrics.load_failures.inc()
        error = f"version source failed: {type(exc).__name__}: {exc}"
        # Log a repeated error once, because the poll thread calls the source every interval.
        if error != self._last_source_error:
            logger.warning("%s, so the active version keeps serving", error)
            self._last_source_error = error
        return RefreshOutcome(self._active_version(), changed=False, error=error)

    def _active_version(self) -> str | None:
        model = self._model
        return model.version if model is not None else None

    def start_polling(self) -> None:
        """Start the background thread that calls ``refresh`` every poll interval."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll, name="driftloop-model-poller", daemon=True
        )
        self._thread.start()

    def stop_polling(self, timeout_s: float = 5.0) -> None:
        """Stop the poll thread, waiting up to ``timeout_s`` for a load in progress."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("model poll thread still running after %.1f s", timeout_s)
        self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            try:
                self.refresh()
                self.preload()
            except Exception:
                # refresh() and preload() catch load and source errors themselves. This
                # keeps the thread alive after anything else.
                logger.exception("model poll failed")


def create_app(
    *,
    base_model: str,
    version_source: VersionSource,
    emitter: EventEmitter | None,
    max_batch: int = 256,
    max_text_chars: int = 2000,
    poll_interval_s: float = 1.0,
    device: str | None = None,
    num_threads: int | None = None,
    registry: CollectorRegistry | None = None,
    loader: Loader | None = None,
    candidate_source: CandidateSource | None = None,
    preload_candidates: int = 1,
    keep_previous: int = 1,
    max_concurrent_predictions: int = 2,
    reload_token: str | None = None,
) -> FastAPI:
    """Build the inference app.

    ``version_source`` returns the active ``(version_name, adapter_dir)``, optionally with the
    run id it was registered from as a third item, or None. ``candidate_source``,
    ``preload_candidates`` and ``keep_previous`` set the models kept warm (see
    ``ModelHolder``). At most ``max_concurrent_predictions`` requests run a forward pass at
    once; the others wait in arrival order. ``loader``
    is called as ``loader(base_model, adapter_dir, version)`` and defaults to
    ``Classifier.load`` with ``device`` and ``num_threads``. At startup the app loads the
    first version before it accepts requests, starts the poll thread and starts ``emitter``.
    At shutdown it stops the poll thread and closes ``emitter``, which flushes queued events.
    ``registry`` defaults to a new ``CollectorRegistry``. A registry can back only one app,
    because the metric names would collide. With ``reload_token`` set, POST /v1/admin/reload
    takes only that bearer token.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if max_text_chars < 1:
        raise ValueError(f"max_text_chars must be at least 1, got {max_text_chars}")
    if poll_interval_s <= 0:
        raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
    if max_concurrent_predictions < 1:
        raise ValueError(f"max_concurrent_predictions must be at least 1, got {max_concurrent_predictions}")

    registry = registry if registry is not None else CollectorRegistry()
    metrics = ServerMetrics.register(registry)

    if loader is None:
        from retrain.model import BaseModelCache

        # Versions share the base model, so a swap reads only the adapter and head from disk.
        base_cache = BaseModelCache()

        def loader(base: str, adapter_dir: str, version: str) -> Classifier:
            from retrain.model import Classifier

            return Classifier.load(
                base, adapter_dir, version, device=device, num_threads=num_threads, base_cache=base_cache
            )

    holder = ModelHolder(
        version_source,
        lambda version, adapter_dir: loader(base_model, adapter_dir, version),
        poll_interval_s=poll_interval_s,
        metrics=metrics,
        candidate_source=candidate_source,
        preload_candidates=preload_candidates,
        keep_previous=keep_previous,
    )

    reload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftloop-reload")
    prediction_slots = asyncio.Semaphore(max_concurrent_predictions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("server starting: base_model=%s", base_model)
        outcome = await run_in_threadpool(holder.refresh)
        if outcome.version is None:
            logger.warning(
                "no model loaded at startup (%s), so /readyz returns 503 until one loads",
                outcome.error or "version source returned no version",
            )
        holder.start_polling()
        if emitter is not None:
            emitter.start()
        yield
        holder.stop_polling()
        reload_executor.shutdown(wait=False)
        if emitter is not None:
            await run_in_threadpool(emitter.close)
        logger.info("server stopped")

    app = FastAPI(title="driftloop inference server", lifespan=lifespan)
    app.state.model_holder = holder
    app.state.emitter = emitter
    app.state.registry = registry

    # A JSON string encodes one character in at most 12 bytes, as two \uXXXX escapes of a
    # surrogate pair, so a larger Content-Length cannot hold a valid request.
    # NOTE: a chunked body has no Content-Length and is read whole before validation.
    max_body_bytes = max_batch * (max_text_chars * 12 + 16) + 4096

    def classify_texts(
        model: Classifier, texts: list[str], return_probabilities: bool
    ) -> dict[str, Any]:
        compute_started = time.perf_counter()
        probabilities = model.predict_proba(texts)
        latency_ms = (time.perf_counter() - compute_started) * 1000.0
        timestamp = time.time()

        labels = list(model.labels)
        predictions = []
        for text, row in zip(texts, probabilities.tolist(), strict=True):
            top_index = max(range(len(row)), key=row.__getitem__)
            event_id = uuid.uuid4().hex
            prediction: dict[str, Any] = {
                "event_id": event_id,
                "label": labels[top_index],
                "probability": row[top_index],
            }
            if return_probabilities:
                prediction["probabilities"] = row
            predictions.append(prediction)

            if emitter is not None:
                emit_event(
                    {
                        "id": event_id,
                        "timestamp": timestamp,
                        "text": text,
                        "label": labels[top_index],
                        "confidence": row[top_index],
                        "probabilities": row,
                        "latency_ms": latency_ms,
                        "version": model.version,
                    }
                )

        response: dict[str, Any] = {"version": model.version, "predictions": predictions}
        if return_probabilities:
            response["labels"] = labels
        return response

    def classify_active(texts: list[str], return_probabilities: bool) -> dict[str, Any]:
        """Classify with the model active when the worker thread starts, read once.

        Reading it here rather than in the handler lets requests that waited for a worker
        thread during a swap run on the new version, and a swap during the computation
        still does not affect it.
        """
        model = holder.model
        try:
            return classify_texts(model, texts, return_probabilities)
        except Exception as exc:
            raise PredictionFailedError(model.version) from exc

    def emit_event(event: dict[str, Any]) -> None:
        try:
            emitter.emit(event)
        except Exception:
            # emit() is not expected to raise. A bug there must not fail the request.
            logger.exception("emitting event %s failed", event["id"])

    def reject(status_code: int, outcome: str, body: dict[str, Any], **headers: str) -> JSONResponse:
        metrics.requests.labels(outcome=outcome).inc()
        return JSONResponse(body, status_code=status_code, headers=headers)

    @app.post(
        "/v1/classify",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
            }
        },
    )
    async def classify(request: Request) -> Response:
        started = time.perf_counter()
        content_length = request.headers.get("content-length")
        if content_length is not None and content_length.isdigit():
            if int(content_length) > max_body_bytes:
                too_large = FieldError("body", f"{content_length} bytes",
                                       f"{content_length} bytes, at most {max_body_bytes} allowed")
                return reject(413, OUTCOME_INVALID, error_body([too_large]))

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raw = (await request.body())[:80].decode("utf-8", "replace")
            invalid = FieldError("body", raw, f"invalid JSON: {exc}")
            return reject(400, OUTCOME_INVALID, error_body([invalid]))
        try:
            texts, return_probabilities = parse_classify_request(
                body, max_batch=max_batch, max_text_chars=max_text_chars
            )
        except InvalidRequestError as exc:
            return reject(422, OUTCOME_INVALID, error_body(exc.errors))

        if holder.model is None:
            return reject(503, OUTCOME_UNAVAILABLE, {"error": NO_MODEL_MESSAGE}, **{"Retry-After": "1"})

        try:
            # Requests wait here in arrival order. Without the bound, every worker thread of the
            # pool would run a forward pass at once, each on all of torch's threads, and a request
            # that starts after a swap would finish only after all of them.
            async with prediction_slots:
                result = await run_in_threadpool(classify_active, texts, return_probabilities)
        except PredictionFailedError as exc:
            logger.error(
                "classify failed on version %s for %d texts",
                exc.version,
                len(texts),
                exc_info=exc.__cause__,
            )
            return reject(
                500,
                OUTCOME_ERROR,
                {"error": f"prediction failed on version {exc.version}: {type(exc.__cause__).__name__}"},
            )

        metrics.requests.labels(outcome=OUTCOME_OK).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(result)

    @app.post("/v1/admin/reload")
    async def reload_version(request: Request) -> Response:
        # Without a configured token the endpoint is open: it only makes the server re-read the
        # version source, which its poll does anyway.
        if reload_token is not None and not bearer_matches(request.headers.get("authorization", ""), reload_token):
            return JSONResponse({"error": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        # Its own thread: under load every worker thread of the shared pool may be busy with a
        # classify request, and a swap must not wait behind them.
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(reload_executor, functools.partial(holder.refresh, force=True))
        if outcome.error is not None:
            return JSONResponse(
                {"version": outcome.version, "error": outcome.error}, status_code=500
            )
        return JSONResponse({"version": outcome.version})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        model = holder.model
        if model is None:
            return JSONResponse(
                {"status": "not ready", "error": NO_MODEL_MESSAGE}, status_code=503
            )
        return JSONResponse({"status": "ready", "version": model.version})

    @app.get("/v1/version")
    async def version() -> Response:
        model = holder.model
        if model is None:
            return JSONResponse({"error": NO_MODEL_MESSAGE}, status_code=503)
        return JSONResponse({"version": model.version, "labels_count": len(model.labels)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        payload = generate_latest(registry)
        if emitter is not None and emitter.registry is not registry:
            payload += generate_latest(emitter.registry)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    return app


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until the process receives SIGINT or SIGTERM."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
