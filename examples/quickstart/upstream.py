#!/usr/bin/env python3
"""The quickstart's upstream API: a JSON echo of every request, and a fake LLM under /llm/.

Paths containing /llm/ answer like an LLM API with known token counts, so tollgate's ext_proc can be shown
(and tested) reading usage from response bodies. Query parameters:
  provider=openai|responses|anthropic|gemini  body shape (OpenAI chat completions, OpenAI responses,
                                               Anthropic messages, Gemini generateContent); default openai
  stream=1                  server-sent events instead of one JSON body
  include_usage=0           OpenAI chat streams: leave usage out, as without stream_options.include_usage
  input=N&output=M          token counts reported (default 12 and 30)
  chunks=K&delay_ms=D       content events in a stream and the pause before each (default 4 and 0)
  gzip=1                    content-encoding: gzip
  garbage=1 | nonutf8=1     an unreadable body of the declared type
  pad=N                     N bytes of filler text in the content (a large body)
Everything else: 200 with a JSON echo of the request.

Standard library only. Usage: upstream.py [--host 127.0.0.1] [--port 8080]
"""

import argparse
import gzip
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def _events(provider, n_in, n_out, chunks, include_usage, text):
    """The server-sent events of one streamed answer, as (event name or None, JSON data) pairs."""
    pieces = [text[len(text) * i // chunks:len(text) * (i + 1) // chunks] for i in range(chunks)] if chunks > 0 else []
    if provider == "anthropic":
        yield "message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
            "content": [], "usage": {"input_tokens": n_in, "output_tokens": 1}}}
        yield "content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}
        for piece in pieces:
            yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": piece}}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": n_out}}
        yield "message_stop", {"type": "message_stop"}
    elif provider == "gemini":
        for i, piece in enumerate(pieces, 1):
            # Every chunk carries the usage so far, as Gemini's stream does.
            out = n_out * i // len(pieces)
            yield None, {"candidates": [{"content": {"role": "model", "parts": [{"text": piece}]}}],
                         "usageMetadata": {"promptTokenCount": n_in, "candidatesTokenCount": out,
                                           "totalTokenCount": n_in + out}}
    elif provider == "responses":
        yield "response.created", {"type": "response.created", "response": {"id": "resp_fake", "status": "in_progress"}}
        for piece in pieces:
            yield "response.output_text.delta", {"type": "response.output_text.delta", "delta": piece}
        yield "response.completed", {"type": "response.completed", "response": {
            "id": "resp_fake", "status": "completed",
            "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}}
    else:
        for piece in pieces:
            yield None, {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake",
                         "choices": [{"index": 0, "delta": {"content": piece}}], "usage": None}
        if include_usage:
            yield None, {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake",
                         "choices": [], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                                  "total_tokens": n_in + n_out}}


def _document(provider, n_in, n_out, text):
    """One JSON answer."""
    if provider == "anthropic":
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "usage": {"input_tokens": n_in, "output_tokens": n_out}}
    if provider == "gemini":
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
                "usageMetadata": {"promptTokenCount": n_in, "candidatesTokenCount": n_out,
                                  "totalTokenCount": n_in + n_out}}
    if provider == "responses":
        return {"id": "resp_fake", "object": "response", "status": "completed",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
                "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


class Echo(BaseHTTPRequestHandler):
    server_version = "quickstart-upstream"
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if "/llm/" in self.path:
            self._llm()
            return
        echo = {
            "method": self.command,
            "path": self.path,
            "headers": {name.lower(): value for name, value in self.headers.items()},
            "body_bytes": len(body),
        }
        payload = json.dumps(echo, indent=2, sort_keys=True).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _llm(self):
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        number = lambda name, default: int(query.get(name, default))
        provider = query.get("provider", "openai")
        n_in, n_out = number("input", 12), number("output", 30)
        text = "The forecast is sunny. " * 2 + "x" * number("pad", 0)
        zipped = query.get("gzip") == "1"
        if query.get("stream") == "1":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            events = _events(provider, n_in, n_out, number("chunks", 4),
                             query.get("include_usage", "1") == "1", text)
            try:
                for name, data in events:
                    time.sleep(number("delay_ms", 0) / 1000)
                    event = (f"event: {name}\n" if name else "") + "data: " + json.dumps(data) + "\n\n"
                    self._chunk(event.encode())
                if provider == "openai":
                    self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-stream
            return
        if query.get("garbage") == "1":
            payload = b'{"usage": {"prompt_tokens": 3, "completion_tok'
        elif query.get("nonutf8") == "1":
            payload = b'{"usage": {"total_tokens": 5}, "text": "\xff\xfe"}'
        else:
            payload = json.dumps(_document(provider, n_in, n_out, text)).encode()
        if zipped:
            payload = gzip.compress(payload)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if zipped:
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: %s\n" % (fmt % args))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Echo)
    sys.stderr.write("upstream: listening on %s:%d\n" % (args.host, args.port))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
