"""A real HTTP server on 127.0.0.1 that speaks OpenAI's chat API and misbehaves on demand.

Nothing real fails on cue, so the remote client's fault handling is tested against this: queue
faults with ``push``; once the queue is empty it answers normally. Every request body is kept in
``requests`` so a test can prove what reached the "remote" (and what did not: PII).

    with FaultServer() as fs:
        fs.push(Fault.status(429, retry_after=1), Fault.ok())
        ...  # the client's first attempt gets 429, the second a normal answer
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass
class Fault:
    kind: Literal["ok", "status", "hang", "drop", "eof"]
    code: int = 200
    retry_after: str | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    content: str | None = None  # None: echo the last user message (placeholders and all)

    @classmethod
    def ok(cls, content: str | None = None) -> Fault:
        return cls("ok", content=content)

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None) -> Fault:
        return cls("status", code=code, retry_after=None if retry_after is None else str(retry_after))

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        """Accept the request and say nothing (until the server stops)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls, after_chunks: int) -> Fault:
        """Stream ``after_chunks`` chunks, then cut the TCP connection mid-body."""
        return cls("drop", after_chunks=after_chunks)

    @classmethod
    def eof(cls, after_chunks: int) -> Fault:
        """Stream ``after_chunks`` chunks, then end the body cleanly but without [DONE]."""
        return cls("eof", after_chunks=after_chunks)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class FaultServer:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def next_fault(self) -> Fault:
        with self._lock:
            return self._faults.pop(0) if self._faults else Fault.ok()

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answer_text(body: dict[str, Any], fault: Fault) -> str:
    if fault.content is not None:
        return fault.content
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    return content if isinstance(content, str) else json.dumps(content)


def _handler_for(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._json(200, {"object": "list", "data": [{"id": "fault-model", "object": "model"}]})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            server.requests.append(Received(self.path, dict(self.headers), body))
            fault = server.next_fault()
            if fault.kind == "hang":
                server._stop.wait(fault.seconds)
                self.close_connection = True
                return
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                error = {"error": {"message": f"injected {fault.code}", "type": "server_error"}}
                self._json(fault.code, error, headers)
                return
            text = _answer_text(body, fault)
            if body.get("stream"):
                self._stream(body, text, fault)
            else:
                self._json(200, _completion(body, text))

        def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, body: dict[str, Any], text: str, fault: Fault) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if fault.kind == "eof":
                self.send_header("Connection", "close")  # body ends at EOF: a clean, early close
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunked = fault.kind != "eof"
            pieces = [w + " " for w in text.split(" ")] or [""]
            events = [_chunk(body, piece, None) for piece in pieces]
            events.append(_chunk(body, "", "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**_chunk(body, "", None), "choices": [], "usage": _usage(body, text)})
            limit = fault.after_chunks if fault.kind in ("drop", "eof") else len(events)
            for event in events[:limit]:
                self._send_event(json.dumps(event), chunked)
                time.sleep(0.01)  # real pacing, so pass-through is observable
            if fault.kind == "drop":
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # cut mid-body: no terminating zero-length chunk
                return
            if fault.kind == "ok":
                self._send_event("[DONE]", chunked)
                self.wfile.write(b"0\r\n\r\n")
            self.close_connection = fault.kind == "eof"

        def _send_event(self, data: str, chunked: bool) -> None:
            payload = f"data: {data}\n\n".encode()
            if chunked:
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            else:
                self.wfile.write(payload)
            self.wfile.flush()

    return Handler


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fault-model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": _usage(body, text),
    }


def _chunk(body: dict[str, Any], piece: str, finish: str | None) -> dict[str, Any]:
    delta = {"content": piece} if piece else {}
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "fault-model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
