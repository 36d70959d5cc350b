"""The FastAPI app of `encoder_jax.serve`: request/response models, handlers, limits, lifespan."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Literal, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from encoder_jax import artifact as artifact_lib
from encoder_jax.serve_engine import ENDPOINTS, Engine, RequestError, ServeConfig
from encoder_jax.serve_metrics import Metrics

Text = Union[str, list[str]]  # one text, or a record's texts (e.g. [title, body])
UNION_VARIANTS = ("str", "list[str]")


class ClassifyRequest(BaseModel):
    texts: list[Text] = Field(description="texts to classify; an item may be a list of fields")
    top_k: int = Field(3, ge=1, description="how many of the most likely labels to list")


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]
    probabilities: dict[str, float]
    truncated: bool = Field(description="the text was cut to the model's max_len tokens")


class ClassifyResponse(BaseModel):
    results: list[Classification]


class EmbedRequest(BaseModel):
    texts: list[str]
    pooling: Literal["cls", "mean"] = "cls"
    normalize: bool = Field(False, description="scale each embedding to unit L2 norm")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    truncated: list[bool]


class FillMaskRequest(BaseModel):
    texts: list[str] = Field(description="texts with one or more [MASK] markers")
    top_k: int = Field(5, ge=1)


class TokenScore(BaseModel):
    token: str
    token_id: int
    score: float


class FillMaskResult(BaseModel):
    masks: list[list[TokenScore]] = Field(description="per [MASK], its top_k candidates")
    truncated: bool


class FillMaskResponse(BaseModel):
    results: list[FillMaskResult]


class TranslateRequest(BaseModel):
    texts: list[str] = Field(description="source sentences")
    nbest: int = Field(1, ge=1, description="hypotheses per sentence (at most the beam size)")


class Hypothesis(BaseModel):
    translation: str
    score: float


class Translation(BaseModel):
    translation: str
    score: float = Field(description="log-probability / GNMT length penalty (beam), or sum (greedy)")
    nbest: list[Hypothesis]
    truncated: bool


class TranslateResponse(BaseModel):
    results: list[Translation]


def error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status,
                        headers={"Retry-After": "1"} if status == 429 else None)


def validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    """The first validation error as (status, field, one line); bad JSON is a 400."""
    first = exc.errors()[0]
    # pydantic adds the tried variant of a Union ("str", "list[str]") to the location
    loc = [str(part) for part in first.get("loc", ())
           if part != "body" and not (isinstance(part, str) and part in UNION_VARIANTS)]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return 400, "body", "body: malformed JSON"
    return 422, field, f"{field}: {first.get('msg', 'invalid')}"


class Guard:
    """ASGI middleware (plain ASGI: Starlette's BaseHTTPMiddleware costs about as much as the
    model per request): a body over `limit` bytes gets 413 before the app reads it, and every
    answer to an inference endpoint is counted and timed."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics
        self.observed = set(ENDPOINTS.values())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.observed:
            return await self.app(scope, receive, send)
        start, path = time.monotonic(), scope["path"]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                self.metrics.observe_request(path, message["status"], time.monotonic() - start)
            await send(message)

        return await self.limited(scope, receive, observed_send)

    async def limited(self, scope, receive, send):
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        body, more = b"", True
        if declared is None or int(declared) <= self.limit:
            while more and len(body) <= self.limit:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
        if (declared is not None and int(declared) > self.limit) or len(body) > self.limit:
            return await error(413, "body", f"body: over {self.limit} bytes "
                               f"(--max_body_bytes)")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _classify_results(engine: Engine, rows, outputs, top_k: int) -> dict[str, Any]:
    labels = engine.artifact.labels
    results = []
    for row, probs in zip(rows, outputs):
        order = np.argsort(-probs)
        scores = probs.tolist()
        results.append({"label": labels[order[0]], "score": scores[order[0]],
                        "top_k": [{"label": labels[i], "score": scores[i]} for i in order[:top_k]],
                        "probabilities": dict(zip(labels, scores)), "truncated": row.truncated})
    return {"results": results}


def _fill_mask_results(engine: Engine, rows, outputs, top_k: int) -> dict[str, Any]:
    piece = engine.artifact.tokenizer.id_to_piece
    results = []
    for row, out in zip(rows, outputs):
        masks = [[{"token": piece(int(i)), "token_id": int(i), "score": float(p)}
                  for i, p in zip(out["ids"][m, :top_k], out["probs"][m, :top_k])]
                 for m in range(len(row.positions))]
        results.append({"masks": masks, "truncated": row.truncated})
    return {"results": results}


def _register_routes(app: FastAPI, engine: Engine, metrics: Metrics) -> None:
    kinds = engine.kinds

    if "classify" in kinds:
        @app.post(ENDPOINTS["classify"], response_model=ClassifyResponse)
        async def classify(request: ClassifyRequest) -> JSONResponse:
            rows, outputs = await engine.infer("classify", request.texts)
            return JSONResponse(_classify_results(engine, rows, outputs, request.top_k))

    if "embed" in kinds:
        @app.post(ENDPOINTS["embed"], response_model=EmbedResponse)
        async def embed(request: EmbedRequest) -> JSONResponse:
            rows, outputs = await engine.infer("embed", request.texts)
            vectors = np.stack([out[request.pooling] for out in outputs])
            if request.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            return JSONResponse({"embeddings": vectors.tolist(), "dim": vectors.shape[-1],
                                 "truncated": [row.truncated for row in rows]})

    if "translate" in kinds:
        beam = engine.artifact.card["translate"]["beam_size"]

        @app.post(ENDPOINTS["translate"], response_model=TranslateResponse)
        async def translate(request: TranslateRequest) -> JSONResponse:
            if request.nbest > beam:
                raise RequestError(422, "nbest", f"nbest: at most the export's beam size {beam}")
            rows, outputs = await engine.infer("translate", request.texts)
            return JSONResponse(_translate_results(engine, rows, outputs, request.nbest))

    if "fill_mask" in kinds:
        top = engine.artifact.top_k

        @app.post(ENDPOINTS["fill_mask"], response_model=FillMaskResponse)
        async def fill_mask(request: FillMaskRequest) -> JSONResponse:
            if request.top_k > top:
                raise RequestError(422, "top_k", f"top_k: at most {top} for this export")
            rows, outputs = await engine.infer("fill_mask", request.texts)
            return JSONResponse(_fill_mask_results(engine, rows, outputs, request.top_k))


def _translate_results(engine: Engine, rows, outputs, nbest: int) -> dict[str, Any]:
    results = []
    for row, out in zip(rows, outputs):
        empty = not row.ids[:-1].size  # an empty source: an empty translation, as --mode predict
        hyps = [{"translation": "" if empty else engine.artifact.detokenize(out["tokens"][k]),
                 "score": float(out["scores"][k])} for k in range(nbest)]
        results.append({**hyps[0], "nbest": hyps, "truncated": row.truncated})
    return {"results": results}


def build_app(loaded: artifact_lib.Artifact, cfg: ServeConfig) -> Any:
    """The ASGI app serving `loaded`; warm-up starts with the app and /ready says when it is done."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    engine = Engine(loaded, cfg, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=engine.warm_up, name="warm-up", daemon=True).start()
        yield
        engine.batcher.stop(timeout=30)  # uvicorn has drained the connections by now

    app = FastAPI(title="encoder_jax", version=str(loaded.card.get("format")), lifespan=lifespan,
                  description=f"{loaded.task} model from {loaded.card['source']['workdir']} "
                              f"(checkpoint {loaded.card['source']['checkpoint']}, "
                              f"step {loaded.card['source']['step']})")
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error(exc.status, exc.field, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(*validation_message(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not engine.ready.is_set():
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "task": loaded.task, "endpoints": [ENDPOINTS[k] for k in engine.kinds],
                "labels": loaded.labels, "max_len": loaded.max_len, "lengths": list(engine.lengths),
                "batch_sizes": list(engine.row_counts), "source": loaded.card["source"]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _register_routes(app, engine, metrics)
    return Guard(app, cfg.max_body_bytes, metrics)
