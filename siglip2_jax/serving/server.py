"""The HTTP server's process: uvicorn running the app, and a drain before the exit on SIGTERM or Ctrl-C.
`siglip2-jax serve` (`siglip2_jax.commands.serve`) starts it."""

from __future__ import annotations

import signal
import sys


def serve(pipeline, settings, *, host: str, port: int) -> None:
    """Serves `pipeline` (a loaded `Siglip2Pipeline`) with `settings` (a `ServerSettings`) on host:port until
    SIGTERM or Ctrl-C, then answers the requests in progress and returns."""
    import uvicorn

    from .app import create_app

    print(f"siglip2-jax serve: {settings.model_name} on http://{host}:{port}; compiling every batch "
          f"shape first (GET /health turns 200 when ready)", file=sys.stderr, flush=True)
    app = create_app(pipeline, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers in place
    # the re-raised signal does nothing and a clean shutdown exits 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _draining_server(config, app.state.server).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _draining_server(config, state):
    """uvicorn's server with a drain before the exit: on SIGTERM (or Ctrl-C) new requests get 503 while
    the ones in progress are answered; only then does the listener close and the process exit 0. A second
    signal exits at once. (uvicorn alone closes the listener first, so a request still in the accept
    queue at that moment would be cut off.)"""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.stopping:
                return super().handle_exit(sig, frame)
            state.stopping = True
            print("siglip2-jax serve: stopping: answering the requests in progress, refusing new ones",
                  file=sys.stderr, flush=True)

            def drain():
                state.wait_idle(DRAIN_TIMEOUT_S)
                super(DrainingServer, self).handle_exit(sig, frame)
            threading.Thread(target=drain, daemon=True).start()

    return DrainingServer(config)


DRAIN_TIMEOUT_S = 60
