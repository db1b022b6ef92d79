"""A fake HTTP endpoint on 127.0.0.1 that answers 401 and echoes the request headers back, then stops."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _EchoUnauthorized(BaseHTTPRequestHandler):
    as_json = True

    def _answer(self) -> None:
        headers = dict(self.headers.items())
        if self.as_json:  # B2's error shape, the message quoting every header as a proxy might
            body = json.dumps({"status": 401, "code": "unauthorized", "message": f"denied; request headers {headers}"})
        else:
            body = "<html>401: " + "; ".join(f"{name}: {value}" for name, value in headers.items()) + "</html>"
        data = body.encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json" if self.as_json else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextmanager
def echo_401_server(*, as_json: bool = True, timeout_s: float = 60.0) -> Iterator[str]:
    """The base URL of a server that answers every request with 401 and the request's headers.

    It listens on 127.0.0.1 only and shuts down when the block ends, or after `timeout_s` in any case.
    """
    handler = type("Handler", (_EchoUnauthorized,), {"as_json": as_json})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(timeout_s, server.shutdown)
    stopper.daemon = True
    stopper.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
