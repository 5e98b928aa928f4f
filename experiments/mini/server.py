"""The miniature's stand-ins for the stronger LLMs, served over HTTP as an OpenAI-compatible endpoint
on 127.0.0.1: the CLAIR reviser (the task's minimal reviser) and a judge (the task's scorer, as a
1-10 grade), so the online loop's `clair` and `judge` labelers run through the real client.
"""

from __future__ import annotations

import http.server
import json
import re
import threading

from experiments.mini import task

_PROMPT = re.compile(r"Compute ([-+ 0-9]+)\.")


def problem_of(prompt: str) -> dict:
    """The problem behind a "Compute 7 + 5 - 9." prompt."""
    tokens = _PROMPT.search(prompt).group(1).split()
    return {"prompt": prompt, "numbers": [int(x) for x in tokens[::2]], "ops": tokens[1::2]}


def reply(content: str) -> str:
    """The reviser's or the judge's answer to one request."""
    if "{student_solution}" in content:
        task_text = re.search(r"\{task\}: (.*?)\n\n\{student_solution\}", content, re.S).group(1)
        answer = re.search(r"\{student_solution\}: (.*?)\n\n-----", content, re.S).group(1)
        revised = task.revise(problem_of(task_text), answer)
        return "{teacher_reasoning}: wrong steps recomputed.\n{corrected_student_solution}: " + revised
    prompt = re.search(r"\[Instruction\]\n(.*?)\n\n\[Response\]", content, re.S).group(1)
    answer = re.search(r"\[Response\]\n(.*)\n$", content, re.S).group(1)
    return f"Graded by the task's checker.\nScore: {1 + round(6 * task.score(problem_of(prompt), answer))}"


class Server:
    """`with Server() as url:` an endpoint at `url` until the block ends."""

    def __enter__(self) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = reply(body["messages"][-1]["content"])
                raw = json.dumps({
                    "id": "mini", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
