"""The HTTP server's process: uvicorn running the app, and a drain before the exit on SIGTERM or Ctrl-C.
`siglip2-jax serve` (`siglip2_jax.commands.serve`) starts it."""

from __future__ import annotations

import signal
import socket
import sys
import time


def serve(pipeline, settings, listener: socket.socket) -> None:
    """Serves `pipeline` (a loaded `Siglip2Pipeline`) with `settings` (a `ServerSettings`) on `listener` (from
    `bound_socket`) until SIGTERM or Ctrl-C, then answers the requests in progress and returns."""
    import uvicorn

    from .app import create_app

    host, port = listener.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"siglip2-jax serve: {settings.model_name} on http://{host}:{port}; compiling every batch "
          f"shape first (GET /health turns 200 when ready)", file=sys.stderr, flush=True)
    app = create_app(pipeline, settings)
    config = uvicorn.Config(app, http=_json_error_h11_protocol(), log_level="warning", timeout_graceful_shutdown=60)
    # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers in place
    # the re-raised signal does nothing and a clean shutdown exits 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _draining_server(config, app.state.server).run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening (uvicorn listens once the app starts, so until then
    clients are refused rather than queued). Made before the model loads: a port in use is then one OSError
    at once, where uvicorn would find out only after compiling, and abort the process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: restart while old connections linger
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _json_error_h11_protocol():
    """uvicorn's h11 protocol, except that a request that is not valid HTTP/1.1 (a garbled request line, a bad
    header, conflicting lengths: what h11 refuses before the app sees anything) gets a JSON error in the app's
    OpenAI shape, `{"error": {...}}`, where uvicorn writes plain text. Status 400, then the connection closes,
    as uvicorn does."""
    import json

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .app import error_body

    class JsonErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body("not a valid HTTP/1.1 request (the request line, a header or the "
                                         "framing could not be parsed)", code="bad_http"))
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body.encode()),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorH11Protocol


def _draining_server(config, state):
    """uvicorn's server with a drain before the exit. On SIGTERM (or Ctrl-C):
    1. new requests get 503 (with `Connection: close`) while the ones in progress are answered, until no
       request is in progress and every open connection has had its answer or stayed silent for the
       keep-alive timeout;
    2. the listener stops completing new TCP handshakes (`refuse_new_connections`); the connections made
       before that are accepted, and their requests answered 503, in the same way;
    3. only then does uvicorn close the listener, and the process exits 0.
    A second signal exits at once. (uvicorn alone closes the listener and every connection without a request
    in progress at once, so a request sent just then would be cut off after the client sent it.)"""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.stopping:
                return super().handle_exit(sig, frame)
            state.stopping = True
            print("siglip2-jax serve: stopping: answering the requests in progress, refusing new ones",
                  file=sys.stderr, flush=True)
            threading.Thread(target=self.drain, args=(sig, frame), daemon=True).start()

        def drain(self, sig, frame):
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            silent_until = time.monotonic() + self.config.timeout_keep_alive
            listeners = [sock for server in self.servers for sock in server.sockets]
            self.wait_quiet(listeners, deadline, silent_until)
            for sock in listeners:
                refuse_new_connections(sock)
            time.sleep(HANDSHAKE_SETTLE_S)   # handshakes begun before the filter complete and queue up
            # a connection made just now gets a second to send its request; silent older ones no longer wait
            self.wait_quiet(listeners, deadline, max(silent_until, time.monotonic() + 1.0))
            super().handle_exit(sig, frame)

        def wait_quiet(self, listeners, deadline: float, silent_until: float) -> None:
            """Waits until no request is in progress and no connection is open or queued, except silent
            ones after `silent_until`; at most until `deadline` (time.monotonic() seconds)."""
            while time.monotonic() < deadline:
                connections = list(self.server_state.connections)
                if not state.in_progress and not any(map(_answering, connections)) and (
                        time.monotonic() > silent_until or not (connections or any(map(accept_queue, listeners)))):
                    return
                time.sleep(0.02)

    return DrainingServer(config)


def _answering(connection) -> bool:
    """Whether a uvicorn connection has a request whose response is not yet complete."""
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


def refuse_new_connections(sock) -> None:
    """Makes the listening TCP socket `sock` drop every new SYN (a classic BPF socket filter), so no new
    handshake completes while the connections already made are still accepted and served. The clients'
    SYNs are retried by their kernels, and refused once the listener is closed, so nobody is cut off after
    connecting. Linux only; elsewhere it does nothing. The filter reads the TCP flags byte (offset 13 of the
    TCP header, where a TCP socket filter starts) and drops packets with SYN set and ACK clear."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import struct

    program = [(0x30, 0, 0, 13),           # ldb [13]: the TCP flags
               (0x54, 0, 0, 0x12),         # and #(SYN|ACK)
               (0x15, 0, 1, 0x02),         # jeq #SYN: next (drop), else skip one (keep)
               (0x06, 0, 0, 0),            # ret #0: drop
               (0x06, 0, 0, 0xFFFFFFFF)]   # ret #-1: keep the whole packet
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    sock_fprog = struct.pack("HP", len(program), ctypes.addressof(code))   # struct sock_fprog, native alignment
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, sock_fprog)
    except OSError as error:   # best effort: without it a client connecting at the last moment may be reset
        print(f"siglip2-jax serve: could not stop new connections before closing: {error}", file=sys.stderr,
              flush=True)


def accept_queue(sock) -> int:
    """Connections waiting in the listening socket `sock`'s accept queue: Linux reports it in TCP_INFO's
    tcpi_unacked field for a listener (bytes 24-27). 0 where that is not available."""
    import struct
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 24)[0]
    except (AttributeError, OSError, struct.error):
        return 0


DRAIN_TIMEOUT_S = 60
HANDSHAKE_SETTLE_S = 0.25   # a handshake's round trip; longer ones finish as refused connects
SO_ATTACH_FILTER = 26       # <asm-generic/socket.h>; the socket module does not name it
