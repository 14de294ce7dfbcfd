"""`parley serve`'s HTTP side: an OpenAI-compatible API over Starlette, served by uvicorn.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streamed as server-sent
events (`data: {...}` chunks, then `data: [DONE]`) or not. A handler reads and checks the request
(engine/serve/protocol.py), hands a Job to the engine thread (engine/serve/batcher.py) and reads
the job's events from an asyncio queue that the engine thread fills. A client that goes away
cancels its job: its rows leave the batch at the next step.

Safe by default: it binds 127.0.0.1, and binding another address needs an API key; bodies and
replies have size limits; a request names a model only among those the server was started with,
so no client-sent name or path ever reaches the disk.
"""
import asyncio
import hmac
import json
import socket
import threading
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from engine.errors import ParleyError
from engine.generate import Finished, Token
from engine.serve import protocol
from engine.serve.batcher import Batcher, Engine, Failed, Job
from engine.serve.protocol import ApiError, Limits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20        # a request body; a long chat is tens of kB
    limits: Limits = field(default_factory=Limits)
    max_rows: int = 64                   # rows (choices) decoding together per model; more wait their turn
    log: bool = True                     # keep requests and replies in the store (engine/serve/log.py)

    def check(self) -> "ServeConfig":
        if self.host not in LOOPBACK and not self.api_key:
            raise ParleyError(f"--host {self.host} lets other machines in: give --api-key KEY too (clients send it "
                              "as their OpenAI API key), or keep the default 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ParleyError(f"--port {self.port} is out of range: it must be 0 to 65535")
        for name, value, low in (("--max-tokens", self.limits.max_tokens, 1), ("--max-n", self.limits.max_n, 1),
                                 ("--max-body-bytes", self.max_body_bytes, 1), ("--max-rows", self.max_rows, 1)):
            if value < low:
                raise ParleyError(f"{name} {value} is out of range: it must be {low} or more")
        return self


def build_app(models: dict, engine: Engine, config: ServeConfig, log=None) -> Starlette:
    """The Starlette app for `models` (name -> lm) running in `engine`; `log`: a StoreLog or None."""

    async def list_models(request: Request):
        authorize(request, config.api_key)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "parley",
             "max_model_len": lm.max_context} for name, lm in models.items()]})

    async def chat(request: Request):
        return await complete(request, "chat")

    async def completions(request: Request):
        return await complete(request, "completions")

    async def complete(request: Request, endpoint: str):
        authorize(request, config.api_key)
        req = protocol.parse(endpoint, await read_json(request, config.max_body_bytes), models, config.limits)
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req.prompt_ids, req.settings, _emitter(asyncio.get_running_loop(), events, req, log),
                  top_logprobs=req.top_logprobs)
        engine.submit(req.model, job)
        try:
            first = await _next_event(request, events)
        except BaseException:
            engine.cancel(job)
            raise
        if first is None:               # the client went away while the job waited
            engine.cancel(job)
            return JSONResponse({}, status_code=499)
        if isinstance(first, Failed):
            raise ApiError(500 if first.internal else 400, first.message,
                           kind="server_error" if first.internal else "invalid_request_error")
        if req.stream:
            return EventStream(_stream(req, first, events), on_close=lambda: engine.cancel(job),
                               media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            finished, tokens = await _collect(request, req, first, events)
        finally:
            engine.cancel(job)          # nothing if it finished; frees its rows if the client went away
        if finished is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(protocol.response(req, finished, tokens))

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     kind=kind).body(), status_code=exc.status_code)

    routes = [Route("/v1/models", list_models, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})


def authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "this server needs an API key: send it as 'Authorization: Bearer KEY' (the openai "
                            "client's api_key)", code="invalid_api_key")


async def read_json(request: Request, limit: int):
    """The body as JSON, refused past `limit` bytes. A body somewhat over the limit is read to its
    end before the refusal, so the client, still sending, gets the 413 rather than a reset
    connection; one declared far larger is refused at once."""
    too_big = ApiError(413, f"the request body is larger than this server takes ({limit} bytes): send less, or "
                            "start `parley serve --max-body-bytes N`", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > DRAIN * limit:
        raise too_big
    body, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size > DRAIN * limit:
            raise too_big
        if size <= limit:
            body += part
    if size > limit:
        raise too_big
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}") from None


DRAIN = 4   # bodies up to this many times the limit are read through before the 413 (read_json)


def _emitter(loop, events: asyncio.Queue, req, log):
    """The job's `emit`, called in the engine thread: events go to the handler's queue, and once
    every choice has finished the request goes to the store (whether or not the client stayed)."""
    finished: list[Finished] = []
    lock = threading.Lock()

    def emit(event) -> None:
        if isinstance(event, Finished) and log is not None:
            with lock:
                finished.append(event)
                if len(finished) == len(req.settings):
                    log.add(req, list(finished))
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:   # the event loop is closed: the server is shutting down
            pass
    return emit


async def _next_event(request: Request, events: asyncio.Queue):
    """The job's next event, or None if the client disconnects first."""
    get = asyncio.ensure_future(events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if get in done:
        return get.result()
    get.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, req, event, events: asyncio.Queue):
    """Every choice's Finished (and Tokens, for logprobs), or (None, None) if the client went away."""
    finished, tokens = [], {}
    while True:
        if isinstance(event, Failed):
            raise ApiError(500 if event.internal else 400, event.message)
        if isinstance(event, Token) and req.logprobs:
            tokens.setdefault(event.candidate, []).append(event)
        elif isinstance(event, Finished):
            finished.append(event)
            if len(finished) == len(req.settings):
                return finished, tokens
        event = await _next_event(request, events)
        if event is None:
            return None, None


async def _stream(req, event, events: asyncio.Queue):
    """The server-sent events of a streamed reply: a role chunk (chat), a chunk per token with
    text (or logprobs), a finish chunk per choice, the usage chunk if asked for, then [DONE]."""
    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
    if req.endpoint == "chat":
        yield sse(protocol.chunk(req, [protocol.delta_choice(req, i, role=True) for i in range(len(req.settings))]))
    finished = []
    while True:
        if isinstance(event, Failed):   # after the stream began, the status is sent: say it in the stream
            yield sse(ApiError(500, event.message, kind="server_error").body())
            break
        if isinstance(event, Token) and (event.text or req.logprobs):
            yield sse(protocol.chunk(req, [protocol.delta_choice(req, event.candidate, event.text, event)]))
        elif isinstance(event, Finished):
            finished.append(event)
            yield sse(protocol.chunk(req, [protocol.delta_choice(req, event.candidate,
                                                                 finish_reason=event.finish_reason)]))
            if len(finished) == len(req.settings):
                break
        event = await events.get()
    if req.include_usage and len(finished) == len(req.settings):
        yield sse(protocol.chunk(req, [], protocol.usage(req, finished)))
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A streamed reply that calls `on_close` however it ends: done, or the client gone mid-stream
    (Starlette cancels the stream, or a send fails, depending on the ASGI version)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Server:
    """The engine thread, the store log and uvicorn for `models` (name -> lm). `run()` serves until
    interrupted (the CLI); `start()` serves from a thread until `stop()` (tests, benchmarks)."""

    def __init__(self, models: dict, config: ServeConfig):
        import uvicorn
        self.config = config.check()
        self.engine = Engine({name: Batcher(lm, config.max_rows) for name, lm in models.items()})
        if config.log:
            from engine.serve.log import StoreLog
            self.log = StoreLog()
        else:
            self.log = None
        self.app = build_app(models, self.engine, config, self.log)
        # The socket is bound here, not by uvicorn: a port in use is one line, and port 0's pick is known.
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.host, config.port))
        except OSError as e:
            self.close()
            raise ParleyError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}: pick another "
                              "--port (or --host)") from None
        self.port = self.socket.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}/v1"

    def run(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.close()

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name="parley-serve-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise ParleyError(f"parley serve could not start on {self.config.host}:{self.port}")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.close()

    def close(self) -> None:
        self.engine.stop()
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.log is not None:
            self.log.close()
            self.log = None
