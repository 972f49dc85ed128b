"""The engine behind a JSON endpoint: the standard library's threaded HTTP server, one thread per connection.

  POST /sample  {"class": 3, "images": 4, "seed": 0, "cfg_scale": 2.0, "temperature": 1.0, "top_k": 0,
                 "top_p": 1.0, "format": "grid"}
    -> image/png, the images in a grid 2 px apart ("format": "grid", the default), or application/json
       {"images": [base64 PNG, ...]} ("format": "images"). Only "class" is required: "images" defaults to 1,
       "seed" to 0, the sampling settings to the server's (the checkpoint's config.sample).
  GET /info     -> {"classes": N, "class_names": [...], "vocab_size": V, "max_images": M, "max_pending": P,
                    "defaults": {...}}

Image i is image i of `python -m npp_jax.sample --labels c,c,... --seed s` with the same settings. Every error is
application/json {"error": "<one sentence>"}: 400 for a bad request, 404/405 for a wrong path or method, 413 for a
body over 64 KiB, 429 with Retry-After when the queue is full ("busy, try again"), 503 while shutting down. A client
that disconnects before its answer cancels its request, which frees its rows.
"""

from __future__ import annotations

import base64
import dataclasses
import http
import http.server
import json
import select
import socket
import threading
import time
from typing import Any

from npp_jax import errors
from npp_jax import images as image_io
from npp_jax.sampling import decoding
from npp_jax.serving import engine as engine_lib

MAX_BODY = 64 * 1024
GRID_PAD = 2
FORMATS = ("grid", "images")
SETTING_FIELDS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")
WHOLE_FIELDS = ("class", "images", "seed", "cfg_interval", "top_k")
FIELDS = ("class", "images", "seed", "format", *SETTING_FIELDS)
POLL_SECONDS = 0.05  # how often a waiting handler checks that its client is still there


def parse_request(body: Any, defaults: decoding.SamplingSettings) -> tuple[engine_lib.ImageRequest, str]:
  """(the request, the answer's format) of a decoded JSON body; InvalidInput, one sentence, for a bad one."""
  if not isinstance(body, dict):
    raise errors.InvalidInput("the body must be a JSON object such as {\"class\": 3, \"images\": 4}")
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise errors.InvalidInput(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
  if "class" not in body:
    raise errors.InvalidInput("the field \"class\" (a class id) is required")
  for name, value in body.items():
    if name == "format":
      if value not in FORMATS:
        raise errors.InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
      raise errors.InvalidInput(f"{name} must be a number, got {value!r}")
    elif name in WHOLE_FIELDS and not float(value).is_integer():
      raise errors.InvalidInput(f"{name} must be a whole number, got {value!r}")
  settings = dataclasses.replace(defaults, **{k: int(body[k]) if k in WHOLE_FIELDS else float(body[k])
                                               for k in SETTING_FIELDS if k in body})
  request = engine_lib.ImageRequest(label=int(body["class"]), num_images=int(body.get("images", 1)),
                                    seed=int(body.get("seed", 0)), settings=settings)
  return request, body.get("format", "grid")


class Server(http.server.ThreadingHTTPServer):
  """The HTTP server; `engine`, `defaults` and `info` are what its handlers serve."""

  daemon_threads = True  # a handler waiting on a request does not hold up shutdown
  request_queue_size = 256  # the listen backlog: a burst of connections waits to be told "busy", not reset

  def __init__(self, address: tuple[str, int], engine: engine_lib.Engine, defaults: decoding.SamplingSettings,
               class_names: list[str]):
    self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
    super().__init__(address, Handler)
    self.engine, self.defaults = engine, defaults
    self.info = {"classes": engine.num_classes, "class_names": class_names, "vocab_size": engine.vocab_size,
                 "max_images": engine.max_images, "max_pending": engine.max_pending,
                 "defaults": {k: getattr(defaults, k) for k in SETTING_FIELDS}}

  def serve_in_thread(self) -> threading.Thread:
    thread = threading.Thread(target=self.serve_forever, name="http-api", daemon=True)
    thread.start()
    return thread


class Handler(http.server.BaseHTTPRequestHandler):
  server: Server
  protocol_version = "HTTP/1.1"

  def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
    del format, args  # no line per request on the server's console

  def do_GET(self) -> None:  # noqa: N802 (the standard library's naming)
    if self.path == "/info":
      self._send(http.HTTPStatus.OK, "application/json", json.dumps(self.server.info).encode())
    elif self.path == "/sample":
      self._error(http.HTTPStatus.METHOD_NOT_ALLOWED, "/sample takes a POST with a JSON body")
    else:
      self._error(http.HTTPStatus.NOT_FOUND, f"no such path {self.path}; the API has POST /sample and GET /info")

  def do_POST(self) -> None:  # noqa: N802
    if self.path != "/sample":
      self._error(http.HTTPStatus.NOT_FOUND, f"no such path {self.path}; the API has POST /sample and GET /info")
      return
    length = self.headers.get("Content-Length") or "0"
    if not length.isdigit() or int(length) > MAX_BODY:
      self.close_connection = True  # the body stays unread
      self._error(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must have a Content-Length of at most "
                  f"{MAX_BODY} bytes")
      return
    try:
      body = json.loads(self.rfile.read(int(length)) or b"null")
    except ValueError:
      self._error(http.HTTPStatus.BAD_REQUEST, "the body is not valid JSON; send an object such as {\"class\": 3}")
      return
    started = time.perf_counter()
    try:
      request, answer_format = parse_request(body, self.server.defaults)
      ticket = self.server.engine.submit(request)
      images = self._wait(ticket)
    except engine_lib.Busy as e:
      self._error(http.HTTPStatus.TOO_MANY_REQUESTS, str(e), {"Retry-After": "1"})
      return
    except engine_lib.Cancelled as e:
      self._error(http.HTTPStatus.SERVICE_UNAVAILABLE, str(e))
      return
    except errors.UserError as e:
      self._error(http.HTTPStatus.BAD_REQUEST, str(e))
      return
    if images is None:  # the client left; its rows are freed
      self.close_connection = True
      return
    seconds = {"X-Sampling-Seconds": f"{time.perf_counter() - started:.3f}"}
    if answer_format == "grid":
      grid = image_io.square_grid(images, pad=GRID_PAD)
      self._send(http.HTTPStatus.OK, "image/png", image_io.png_bytes(grid), seconds)
    else:
      encoded = [base64.b64encode(image_io.png_bytes(image)).decode() for image in images]
      self._send(http.HTTPStatus.OK, "application/json", json.dumps({"images": encoded}).encode(), seconds)

  def _wait(self, ticket: engine_lib.Ticket):
    """The ticket's images, or None after cancelling it when the client has gone away."""
    while (images := ticket.wait(POLL_SECONDS)) is None:
      if self._client_gone():
        ticket.cancel()
        return None
    return images

  def _client_gone(self) -> bool:
    """True when the client closed its end (readable with nothing to read) or reset the connection."""
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
    except (ConnectionError, OSError):
      return True

  def _error(self, status: http.HTTPStatus, sentence: str, headers: dict[str, str] | None = None) -> None:
    self._send(status, "application/json", json.dumps({"error": sentence}).encode(), headers)

  def _send(self, status: http.HTTPStatus, content_type: str, payload: bytes,
            headers: dict[str, str] | None = None) -> None:
    try:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(payload)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True  # the client left while we answered
