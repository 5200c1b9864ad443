"""`ctc-serve`: run the OpenAI-compatible server.

Every flag mirrors a field of `server.settings.Settings` (the flags are generated from it, so the
help text, bounds and environment fallbacks are defined once). Precedence: flag, then the
`CTC_<NAME>` environment variable, then the default. With no arguments it serves the demo model
embedded in models/. The engine (`build_engine(settings)`) is built before the server starts
listening, so a configuration that cannot start (a model, drafter or KV cache that does not fit)
ends the process with one error line that says why, and exit code 3, instead of a traceback.
SIGTERM or Ctrl-C start a drain: the server keeps listening, but /health and every new request
answer 503, while requests in flight get up to --shutdown-timeout seconds to finish; then the rest
are aborted (their clients get an error saying the server is shutting down, not a cut connection),
the server stops listening and joins the engine worker. uvicorn then re-raises the signal, so
supervisors see the usual "terminated by SIGTERM" status (143).
With --tensor-parallel-size N > 1 it first starts the N - 1 worker processes (runtime/parallel/) and
watches them: a worker that dies stops the server as a drain does (requests in flight end with an
error), and the process then exits with code 4; the workers are stopped on every way out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing

from pydantic import ValidationError

from server import __version__
from server.settings import Settings

log = logging.getLogger("server.cli")

STARTUP_FAILED_EXIT = 3  # uvicorn's code when the lifespan (engine loading) fails
WORKER_FAILED_EXIT = 4  # a tensor-parallel worker died (or the group broke) while serving
SHUTDOWN_BACKSTOP_S = 5  # uvicorn cuts connections still open this long after the drain
DRAIN_POLL_S = 0.05  # how often the shutdown checks whether the drain is over


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctc-serve",
        description="OpenAI-compatible LLM server with lossless CTC-drafter speculative decoding.",
        epilog="Each flag falls back to the environment variable shown in brackets, then to its default.",
    )
    for name, field in Settings.model_fields.items():
        env = f"CTC_{name.upper()}"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else default
        help_text = f"{field.description} [env {env}; default: {shown}]".replace("%", "%%")
        # A boolean flag alone means true (`--enforce-eager`); `--governor false` still works.
        switch = dict(nargs="?", const="true") if field.annotation is bool else {}
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, choices=choices,
            metavar=None if choices else name.upper(), help=help_text, **switch,
        )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags over the environment; exit 2 with a readable message on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: value for name, value in vars(args).items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits


def _draining_server(config, app, drain_s: float, workers=None):
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette would end every stream the moment a signal arrives, mid-answer; the drain
    # below ends them instead, each with its answer or an error event.
    AppStatus.disable_automatic_graceful_drain()

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose shutdown first runs the engine's drain, still listening: requests
        in flight get `drain_s` seconds to finish, then the rest are aborted, which completes their
        responses. Only then does uvicorn stop listening and wait for the connections to close. Last, once
        the lifespan has joined the engine's thread, the tensor-parallel workers stop: before uvicorn
        re-raises a SIGTERM, which would end this process before anything after `run()`."""

        async def shutdown(self, sockets=None) -> None:
            engine = app.state.engine  # None if it never finished loading
            if engine is not None:
                # Still listening while the drain runs: /health answers 503 (load balancers take us
                # out of rotation) and new requests get a 503 saying why, instead of a refused
                # connection. A second Ctrl-C (force_exit) skips the wait.
                drain = asyncio.ensure_future(engine.drain(drain_s))
                while not drain.done() and not self.force_exit:
                    await asyncio.sleep(DRAIN_POLL_S)
            await super().shutdown(sockets)  # stops listening, closes idle keep-alive connections
            if workers is not None:
                await asyncio.to_thread(workers.close)

    return DrainingServer(config)


def _build_engine(settings: Settings):
    """(engine, its tensor-parallel workers or None); workers started here are stopped if it fails."""
    from server.engine.factory import build_engine
    from server.runtime.parallel.group import WorkerGroup

    workers = None
    if settings.tensor_parallel_size > 1:
        workers = WorkerGroup(settings.model, settings.dtype, settings.device, settings.tensor_parallel_size,
                              log_level=settings.log_level)
    try:
        return build_engine(settings, workers), workers
    except BaseException:
        if workers is not None:
            workers.close()
        raise


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    import uvicorn  # after argument parsing, so that --help stays light

    from server.api.app import create_app

    log.info("model %s, drafter %s, device %s, dtype %s", settings.model, settings.drafter, settings.device,
             settings.dtype)
    from drafter.loading import DrafterLoadError
    from server.engine.types import EngineError
    from server.runtime.cache_plan import CacheSizingError
    from server.runtime.config import ModelConfigError
    from server.runtime.parallel.group import WorkerFailed

    try:
        engine, workers = _build_engine(settings)
    except (CacheSizingError, ModelConfigError, DrafterLoadError, EngineError, WorkerFailed) as exc:  # self-explaining
        log.error("cannot start: %s", exc)
        return STARTUP_FAILED_EXIT
    app = create_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging.basicConfig above formats uvicorn's records too
        log_level=settings.log_level,
        access_log=False,  # serving logs one line per finished request instead
        timeout_graceful_shutdown=SHUTDOWN_BACKSTOP_S,  # after the drain: only final messages are left to send
    )
    server = _draining_server(config, app, settings.shutdown_timeout, workers)
    if workers is None:
        server.run()  # handles SIGINT/SIGTERM: stop accepting, drain, run the lifespan shutdown
        return 0 if server.started else STARTUP_FAILED_EXIT
    workers.on_failure(lambda: setattr(server, "should_exit", True))  # uvicorn polls it: the same drain
    try:
        server.run()
    finally:
        workers.close()  # done already, unless the server failed before its shutdown
    if workers.failure is not None:
        log.error("stopped: %s", workers.failure)
        return WORKER_FAILED_EXIT
    return 0 if server.started else STARTUP_FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
