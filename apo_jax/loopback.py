"""Loopback HTTP servers on 127.0.0.1 that speak the OpenAI chat API: the stand-ins for a stronger LLM
in the miniature and the real-model pipeline (experiments/mini, experiments/instruct) and the real
server of the client's tests.

`ChatServer(respond)` answers every /chat/completions request with `respond(body)`; `LoopbackServer`
is the base for servers with other behaviour (errors, slow answers, reloads).
"""

from __future__ import annotations

import http.server
import json
import threading


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port) that hands every POST's JSON body to
    `handle(handler, body)`; `url` is its OpenAI-style base URL. Use `with` or call `close()`."""

    def __init__(self, port: int = 0):
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                owner.handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_GET(self):
                owner.handle_get(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, h, body) -> None:
        raise NotImplementedError

    def handle_get(self, h) -> None:
        self.send(h, 404, {"error": {"message": f"no GET {h.path}"}})

    @staticmethod
    def send(h, code: int, payload, headers=None) -> None:
        """A JSON response; a client that already hung up is not an error."""
        raw = json.dumps(payload).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @classmethod
    def send_chat(cls, h, model: str, content: str, usage: tuple[int, int] = (0, 0)) -> None:
        """A chat.completion answer with `content`; `usage` = (prompt, completion) tokens."""
        prompt, completion = usage
        message = {"role": "assistant", "content": content}
        tokens = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        cls.send(
            h,
            200,
            {
                "id": "loopback",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": tokens,
            },
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ChatServer(LoopbackServer):
    """A /chat/completions endpoint answering every request with `respond(body) -> content` and keeping
    each request body in `bodies`; `usage` = (prompt, completion) tokens reported per answer."""

    def __init__(self, respond, usage: tuple[int, int] = (0, 0)):
        self.respond, self.usage, self.bodies = respond, usage, []
        super().__init__()

    def handle(self, h, body) -> None:
        with self.lock:
            self.bodies.append(body)
        self.send_chat(h, body["model"], self.respond(body), self.usage)
