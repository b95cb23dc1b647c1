"""Ray Serve deployments: the FastAPI ingress here; the model replicas (one encoder deployment per modality,
the fusion deployment, the whole-model deployment of the `single` topology) in replicas.py.

  HTTP -> Ingress (validate, 4xx) --asyncio.gather--> ImageEncoder / TextEncoder / AudioEncoder (@serve.batch)
                                  --------------------> Fusion                                  (@serve.batch)
       single topology: Ingress -> Model (@serve.batch: preprocess, encode, fuse in one replica)
     monolith topology: Monolith (the Ingress class loading the whole model itself, @serve.batch on its own
                        method: one deployment, one replica hop fewer than `single`)

Preprocessing runs in the encoder deployments, not in the ingress: decoding and resizing cost as much as a
small encoder, so they scale with that modality's replicas (the GPU image encoder's node does its own JPEG
decoding), batches go through the vectorised batch kernels shared with Ray Data, and encoded media (a few KB)
travel between replicas instead of float tensors. The ingress stays light (no torch import) and only checks
what needs no decoding: size, content type, fields, base64, API key, the model's modalities (in the
monolith topology it imports torch and runs the model too: light scaling traded for the hop). It awaits the
encoders itself (rather than chaining their responses into the fusion call) so that a decode error becomes a
400 naming the modality and a full encoder queue a 503 with Retry-After before fusion is asked for anything.

The decorators are bare: replicas, CPUs/GPUs, autoscaling, queue limits and batch sizes (user_config) come
from serve/*.yaml; a deployment without user_config batches with BatchConfig's defaults. Every batched
deployment counts its batch sizes (`batch_stats`, also in /v1/metadata).
"""


import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

import mmfusion
from mmfusion.serving.guards import check_client_headers, check_host, check_origin
from mmfusion.serving.http import multipart_parts, read_body
from mmfusion.serving.metrics import BatchSizes, ObserveRequests
from mmfusion.serving.replicas import BATCH, Replica, load_model
from mmfusion.serving.schemas import (
    ErrorResponse,
    Health,
    Metadata,
    Prediction,
    PredictJSON,
    RequestError,
    ServeArgs,
    check_api_key,
    check_modalities,
    content_kind,
    inputs_from_parts,
    parse_json_body,
)

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0  # /healthz fails when a backend deployment does not answer a ping in this time
# --------------------------------------------------------------------------------------------- ingress

api = FastAPI(
    title="mmfusion",
    version=mmfusion.__version__,
    description="Multimodal (image + text + audio) fusion classifier. POST any non-empty subset of the "
                "model's modalities to /v1/predict, as multipart/form-data files or as JSON with base64 "
                "media.",
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in {
        400: "undecodable input (corrupt image, not audio, invalid base64, not UTF-8, empty body, duplicate "
             "JSON key, a reserved Ray header)",
        401: "missing or wrong API key", 403: "Host not allowed, or a cross-origin browser request",
        408: "the request took longer than the server's request_timeout_s",
        413: "request body above max_request_bytes",
        415: "Content-Type is neither application/json nor multipart/form-data",
        422: "unknown field, no modality, a modality the model lacks, a silent clip",
        503: "overloaded (a queue is full), or a model replica failed or died: retry after the Retry-After "
             "header's seconds"}.items()}
_MULTIPART_SCHEMA = {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary", "description": "encoded image file"},
    "audio": {"type": "string", "format": "binary", "description": "encoded audio file"},
    "text": {"type": "string"}}}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    "application/json": {"schema": PredictJSON.model_json_schema()}}}}


api.add_middleware(ObserveRequests)  # Prometheus metrics and the access-log line (serving/metrics.py)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    request.state.reject = exc.field  # the rejected-inputs counter's reason
    return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    field = {404: "path", 405: "method"}.get(exc.status_code, "request")
    return JSONResponse(RequestError(exc.status_code, field, str(exc.detail)).payload(),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The JSON error shape even for a bug (the traceback goes to the replica's log, not to the client)."""
    log.error("unexpected %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return JSONResponse(RequestError(500, "server", f"internal error ({type(exc).__name__})").payload(),
                        status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ["request"], "msg": "invalid request"}
    field = ".".join(str(x) for x in first.get("loc", ["request"])[1:]) or "request"
    return JSONResponse(RequestError(422, field, str(first.get("msg"))).payload(), status_code=422)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, API key, fan-out to the encoders (split) or the whole model (single), or the
    whole model in this replica (monolith: deployed under the name Monolith, batching like Model does)."""

    BATCHED = "predict_rows"  # the monolith's @serve.batch method (reconfigure sets its knobs)

    def __init__(self, args: ServeArgs, encoders: dict[str, DeploymentHandle] | None = None,
                 fusion: DeploymentHandle | None = None, model: DeploymentHandle | None = None) -> None:
        from mmfusion.artifact import read_artifact_info

        self.args = ServeArgs.model_validate(args)
        self.info = read_artifact_info(self.args.artifact)
        self.api_key = self.args.resolve_api_key()
        self.encoders = encoders or {}
        self.fusion = fusion
        self.model = model
        self.runner: Any = None  # the monolith's ModelRunner
        self.stats = BatchSizes()
        if self.args.topology == "monolith":
            from mmfusion.serving.engine import ModelRunner

            art, dev = load_model(self.args.artifact, self.args.device, self.args.torch_threads)
            self.runner = ModelRunner(art.model, art.cfg.data, dev)
            self.runner.probe()  # fail at start, not on the first request
            log.info("monolith: the whole model in the ingress replica, on %s", dev)
        if self.args.topology == "split" and (set(self.encoders) != set(self.info.modalities)
                                              or fusion is None):
            raise ValueError(f"split topology needs encoders for {self.info.modalities} "
                             "and a fusion deployment")
        if self.args.topology == "single" and model is None:
            raise ValueError("single topology needs the Model deployment")
        self.backends: dict[str, DeploymentHandle] = (
            {**{f"{m}_encoder": h for m, h in self.encoders.items()}, "fusion": fusion}  # type: ignore[dict-item]
            if self.args.topology == "split" else {"model": model}  # type: ignore[dict-item]
            if self.args.topology == "single" else {})  # monolith: no backend deployment
        log.info("ingress for %s (%s, %s): auth %s", self.info.path.name, self.args.topology,
                 ", ".join(self.info.modalities), "on" if self.api_key else "off")

    # ---- the monolith's model (the same knobs, counters and health check as the Model deployment)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch knobs from the deployment's user_config (used by the monolith's batched method)."""
        Replica.reconfigure(self, user_config)  # type: ignore[arg-type]

    def check_health(self) -> None:
        """Serve's periodic health check: the monolith runs its model on a probe input."""
        if self.runner is not None:
            self.runner.probe()

    @serve.batch(max_batch_size=BATCH.max_batch_size, batch_wait_timeout_s=BATCH.batch_wait_timeout_s)
    async def predict_rows(self, items: list[dict[str, bytes | str]]) -> list[Any]:  # -> list[Predicted]
        self.stats.add(len(items))
        return await asyncio.to_thread(self.runner, items)  # the event loop keeps serving HTTP meanwhile

    async def _batch_stats(self) -> list[dict[str, Any]]:
        if self.args.topology == "monolith":
            return [self.stats.as_dict()]
        return await self._call(asyncio.gather(*(h.batch_stats.remote() for h in self.backends.values())))

    def _overloaded(self, what: str) -> RequestError:
        return RequestError(503, "server", f"overloaded ({what}); retry later",
                            headers={"Retry-After": str(self.args.retry_after_s)})

    async def _call(self, coro: Any) -> Any:
        """Await model replicas: a full queue, an unavailable deployment, a dead replica or an exception in
        a replica is a 503 with Retry-After (the client may retry; Serve replaces failed replicas)."""
        try:
            return await coro
        except BackPressureError as e:
            raise self._overloaded("a model queue is full") from e
        except DeploymentUnavailableError as e:
            raise self._overloaded("a model deployment is unavailable") from e
        except RequestError:
            raise
        except Exception as e:  # RayActorError (a replica died), a RayTaskError from a replica, ...
            log.warning("a model replica failed: %s: %s", type(e).__name__, str(e)[:500])
            raise self._overloaded(f"a model replica failed: {type(e).__name__}") from None

    def _guard(self, request: Request) -> dict[str, str]:
        """Host allow-list, Origin check and Ray's control headers, before any work. -> CORS headers to
        add to the answer (for an allowed cross-origin caller)."""
        host, origin = request.headers.get("host"), request.headers.get("origin")
        check_host(host, self.args.allowed_hosts)
        check_origin(origin, host, self.args.allowed_origins)
        check_client_headers(list(request.headers.keys()))
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}

    @api.options("/v1/predict", include_in_schema=False)
    @api.options("/v1/metadata", include_in_schema=False)
    async def preflight(self, request: Request) -> JSONResponse:
        """CORS preflight: allowed only for the server's own origin and allowed_origins."""
        cors = self._guard(request)
        return JSONResponse(None, status_code=204, headers={
            **cors, "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "authorization, content-type, x-api-key",
            "Access-Control-Max-Age": "600"})

    @api.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def healthz(self) -> JSONResponse:
        """200 when every backend deployment answers a ping (no API key needed: for load balancers)."""
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in self.backends.values())),
                                   timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # a timeout, a dead replica, a full queue: not healthy, whatever the cause
            raise RequestError(503, "server", f"a backend deployment did not answer: {type(e).__name__}",
                               headers={"Retry-After": str(self.args.retry_after_s)}) from None
        return JSONResponse(Health(status="ok", topology=self.args.topology).model_dump())

    @api.get("/v1/metadata", response_model=Metadata, responses={401: _ERRORS[401]})
    async def metadata(self, request: Request) -> JSONResponse:
        """Labels, modalities, input limits, recorded accuracy, and each batched deployment's batch sizes."""
        cors = self._guard(request)
        check_api_key(self.api_key, request.headers.get("authorization"), request.headers.get("x-api-key"))
        names = list(self.backends) or ["model"]
        stats = await self._batch_stats()
        cfg = self.info.cfg
        meta = Metadata(
            name=self.info.path.name, topology=self.args.topology, labels=self.info.labels,
            modalities=self.info.modalities,
            encoders={m: getattr(cfg.model.encoders, m).name for m in self.info.modalities},
            fusion=cfg.model.fusion.name, inputs=self.info.input_limits(),
            max_request_bytes=self.args.max_request_bytes, metrics=self.info.evaluation(),
            batching=dict(zip(names, stats, strict=True)))
        return JSONResponse(meta.model_dump(), headers=cors)

    @api.post("/v1/predict", response_model=Prediction, responses=_ERRORS, openapi_extra=_PREDICT_BODY)
    async def predict(self, request: Request) -> JSONResponse:
        """Classify one example from any non-empty subset of the model's modalities."""
        cors = self._guard(request)
        check_api_key(self.api_key, request.headers.get("authorization"), request.headers.get("x-api-key"))
        kind = content_kind(request.headers.get("content-type"))
        # the server's own deadline, whatever the client's headers asked Ray's proxy for: a body that does not
        # arrive in time is the client's 408; models that do not answer in time (a deployment whose replicas
        # are all restarting, an overload) are a 503 with Retry-After, which clients retry
        timeout = self.args.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_body(request, self.args.max_request_bytes)
        except TimeoutError:
            raise RequestError(408, "body", f"the request body did not arrive within {timeout:g} s "
                                            "(request_timeout_s)") from None
        try:
            async with asyncio.timeout_at(deadline):
                pred = await self._predict(request, kind, body)
        except TimeoutError:
            raise self._overloaded(f"the model did not answer within {timeout:g} s") from None
        return JSONResponse(pred.model_dump(), headers=cors)

    async def _predict(self, request: Request, kind: str, body: bytes) -> Prediction:
        limit = self.args.max_request_bytes
        if not body:
            raise RequestError(400, "body", "empty request body: send image, text and/or audio")
        inputs = parse_json_body(body) if kind == "json" else inputs_from_parts(
            await multipart_parts(request, body, limit))
        used = check_modalities(inputs, self.info.modalities)
        request.state.modalities = used  # the request counter's modality subset
        values = inputs.values()
        if self.args.topology != "split":
            out = await self._call(self.predict_rows(values) if self.runner is not None
                                   else self.model.predict.remote(values))  # type: ignore[union-attr]
            if out.error is not None:
                raise self._row_error(out.status, out.modality or "server", out.error)
            probs, truncated, warnings = out.probabilities, out.truncated, out.warnings
        else:
            encoded = await self._call(asyncio.gather(*(self.encoders[m].encode.remote(values[m])
                                                        for m in used)))
            for m, enc in zip(used, encoded, strict=True):
                if enc.error is not None:
                    raise self._row_error(enc.status, m, enc.error)
            truncated = [m for m, enc in zip(used, encoded, strict=True) if enc.warning]
            warnings = [enc.warning for enc in encoded if enc.warning]
            probs = await self._call(self.fusion.fuse.remote(  # type: ignore[union-attr]
                {m: enc.embedding for m, enc in zip(used, encoded, strict=True)}))
            if probs is None:
                raise self._row_error(503, "server", "the fusion failed; retry later")
        idx = int(probs.argmax())
        labels = self.info.labels
        return Prediction(label=labels[idx], index=idx,
                          probabilities={lab: float(p) for lab, p in zip(labels, probs, strict=True)},
                          modalities=used, truncated=truncated, warnings=warnings)

    def _row_error(self, status: int, field: str, message: str) -> RequestError:
        """A replica's answer for one row as an HTTP error; a 503 (the model failed) says when to retry."""
        headers = {"Retry-After": str(self.args.retry_after_s)} if status == 503 else None
        return RequestError(status, field, message, headers=headers)
