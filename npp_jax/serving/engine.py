"""Many requests, one compiled batch: a bounded host queue in front of `row_decoding.RowDecoder`.

  engine = Engine(decoding.Sampler(model), decode, rows=16, max_images=16, max_pending=64, schedule="join")
  engine.warm_up()                                       # compiles everything a request can need, once
  engine.start()                                         # (or `with engine:`, which closes it at the end)
  ticket = engine.submit(ImageRequest(label=3, num_images=4, seed=0, settings=settings))
  images = ticket.wait()                                 # uint8 (4, H, W, 3); ticket.cancel() gives its rows back

Image i of a request is image i of `python -m npp_jax.sample --labels c,c,... --seed s` with the same settings: its
row draws with key fold_in(sample_key(s), i), whatever row it lands in and whoever shares the batch. Waiting images
take free rows first come, first served, so a request of more images than rows spreads over several batches.

Schedules, i.e. when a free row takes the next waiting image:
  join    at every chunk boundary (every `chunk` tokens), while the other rows carry on: a request that arrives
          mid-batch starts within one chunk instead of waiting for the batch to end.
  batch   only once every row is free: the batch fills with the waiting images of as many requests as fit and runs
          until all of them are done.
  single  only once every row is free, and with one request's images only: the page before batches were shared,
          kept as the baseline that bench/serve_load.py compares against.

Bounded: with max_pending unfinished requests, `submit` raises `Busy` at once. A cancelled ticket's rows are freed at
the next chunk boundary and its waiting images never start.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import jax
import numpy as np

from npp_jax import errors
from npp_jax import images as image_io
from npp_jax import sharding
from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.serving import row_decoding

SCHEDULES = ("join", "batch", "single")
MAX_SEED = 2**32 - 1


class Busy(errors.UserError):
  """The queue is full: the request was not taken, and the client may try again."""


class Cancelled(errors.UserError):
  """The request was cancelled (its client went away) or the engine stopped before it was done."""


@dataclasses.dataclass(frozen=True)
class ImageRequest:
  """num_images samples of class `label` under `seed`: images 0..num_images-1 of that seed."""

  label: int
  num_images: int
  seed: int
  settings: decoding.SamplingSettings


class Ticket:
  """A request inside the engine: `wait` for its images, `cancel` to give its rows back."""

  def __init__(self, request: ImageRequest, key_data: np.ndarray):
    self.request = request
    self.key_data = key_data  # (num_images, 2): image i's sample key
    self.started = 0  # images given a row so far
    self.images: list[np.ndarray | None] = [None] * request.num_images
    self.left = request.num_images
    self.cancelled = False
    self.error: Exception | None = None
    self._done = threading.Event()

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def wait(self, timeout: float | None = None) -> np.ndarray | None:
    """uint8 (num_images, H, W, 3), or None if `timeout` seconds pass first; raises the request's error."""
    if not self._done.wait(timeout):
      return None
    if self.error is not None:
      raise self.error
    return np.stack(self.images)

  def cancel(self) -> None:
    """Gives up the request: its rows are freed at the engine's next chunk boundary."""
    self.cancelled = True

  def finish(self, error: Exception | None = None) -> None:
    self.error = error
    self._done.set()


class Engine:
  """One thread drives the rows; any number of threads submit and wait."""

  def __init__(self, sampler: decoding.Sampler, decode: generation.Decode, *, rows: int, max_images: int,
               max_pending: int, schedule: str = "join", chunk: int = 8):
    if schedule not in SCHEDULES:
      raise errors.InvalidInput(f"the schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, value in (("max_images", max_images), ("max_pending", max_pending), ("chunk", chunk)):
      if value < 1:
        raise errors.InvalidInput(f"{name} must be at least 1, got {value}")
    self.decoder = row_decoding.RowDecoder(sampler, rows)
    self.rows, self.max_images, self.max_pending = rows, max_images, max_pending
    self.schedule, self.chunk = schedule, chunk
    self.num_classes, self.vocab_size = sampler.cfg.num_classes, sampler.cfg.vocab_size
    self._decode_buckets = self._bucket_sizes(rows, sampler.num_devices)
    self._decode = {size: sharding.pad_shard_unpad(decode, sampler.mesh, size=size) for size in self._decode_buckets}
    self._cond = threading.Condition()
    self._waiting: collections.deque[Ticket] = collections.deque()  # tickets with images not yet started
    self._unfinished = 0
    self._owners: list[tuple[Ticket, int] | None] = [None] * rows  # (ticket, image index) per row
    self._settings = row_decoding.empty_row_settings(rows)
    self._positions = np.full(rows, self.decoder.block_size, np.int32)  # free rows sit at block_size
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="sampling-engine", daemon=True)

  @staticmethod
  def _bucket_sizes(rows: int, devices: int) -> list[int]:
    """Batch sizes the tokenizer is compiled for: finished images are decoded padded to the next one, so a chunk
    that finishes one image does not decode a whole batch."""
    sizes, size = {rows}, devices
    while size < rows:
      sizes.add(size)
      size *= 2
    return sorted(sizes)

  # -- clients' side ---------------------------------------------------------------------------------------------

  def check(self, request: ImageRequest) -> None:
    """A user error, one sentence, on the first thing wrong with `request`."""
    if not 1 <= request.num_images <= self.max_images:
      raise errors.InvalidInput(f"the number of images must be between 1 and {self.max_images}, got "
                                f"{request.num_images}")
    if not 0 <= request.seed <= MAX_SEED:
      raise errors.InvalidInput(f"the seed must be a whole number between 0 and {MAX_SEED}, got {request.seed}")
    decoding.check_labels([request.label], self.num_classes)
    request.settings.validate(self.vocab_size)
    if request.settings.speculative_window:
      raise errors.InvalidInput("the shared batch decodes one token per pass; speculative decoding is for `sample`")

  def submit(self, request: ImageRequest) -> Ticket:
    """Queues the request; InvalidInput for a bad one, Busy (at once) when max_pending requests are unfinished."""
    self.check(request)
    keys = row_decoding.sample_key_data(generation.sample_key(request.seed), 0, request.num_images)
    ticket = Ticket(request, keys)
    with self._cond:
      if self._closed:
        raise Cancelled("the server is shutting down")
      if self._unfinished >= self.max_pending:
        raise Busy(f"the server is busy ({self._unfinished} requests in progress); try again in a moment")
      self._unfinished += 1
      self._waiting.append(ticket)
      self._cond.notify()
    return ticket

  def images(self, request: ImageRequest) -> np.ndarray:
    """Submits and waits: uint8 (num_images, H, W, 3)."""
    return self.submit(request).wait()

  def warm_up(self) -> None:
    """Compiles the decode chunk and the tokenizer at every batch size it runs at, before the first request."""
    state = self.decoder.advance(self.decoder.empty_state(), self._settings, self._positions, steps=self.chunk)
    jax.block_until_ready(state)
    for size in self._decode_buckets:
      jax.block_until_ready(self._decode[size](np.zeros((size, self.decoder.block_size), np.int32)))

  def start(self) -> "Engine":
    """Starts serving the queue (requests submitted before wait for this)."""
    self._thread.start()
    return self

  def close(self) -> None:
    """Stops the engine thread; unfinished requests fail with Cancelled."""
    with self._cond:
      self._closed = True
      self._cond.notify()
    if self._thread.is_alive():
      self._thread.join()
    with self._cond:  # a thread never started leaves its queue here
      for ticket in list(self._waiting):
        self._finish(ticket, Cancelled("the server is shutting down"))

  def __enter__(self) -> "Engine":
    return self.start()

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- the engine thread -----------------------------------------------------------------------------------------

  def _busy_rows(self) -> np.ndarray:
    return np.asarray([owner is not None for owner in self._owners])

  def _finish(self, ticket: Ticket, error: Exception | None = None) -> None:
    if not ticket.done:
      self._unfinished -= 1
      ticket.finish(error)

  def _admit(self) -> None:
    """Gives free rows to waiting images, as the schedule allows."""
    free = [row for row, owner in enumerate(self._owners) if owner is None]
    if self.schedule != "join" and len(free) < self.rows:
      return
    first = self._waiting[0] if self._waiting else None
    while free and self._waiting and (self.schedule != "single" or self._waiting[0] is first):
      ticket, row = self._waiting[0], free.pop(0)
      index = ticket.started
      row_decoding.set_row(self._settings, row, ticket.request.label, ticket.key_data[index], ticket.request.settings)
      self._owners[row], self._positions[row] = (ticket, index), 0
      ticket.started += 1
      if ticket.started == ticket.request.num_images:
        self._waiting.popleft()

  def _run(self) -> None:
    state, delivery = self.decoder.empty_state(), None
    while True:
      with self._cond:
        while True:
          self._sweep()
          busy = self._busy_rows()
          if self._closed or busy.any() or delivery is not None:
            break
          self._cond.wait()
        if self._closed:
          break
        settings = row_decoding.RowSettings(*(a.copy() for a in self._settings))  # the device may read them late
        positions = self._positions.copy()
      try:
        if busy.any():
          state = self.decoder.advance(state, settings, positions, steps=self.chunk)
        if delivery is not None:  # the previous chunk's finished images, converted while this chunk runs
          self._deliver(*delivery)
          delivery = None
        if busy.any():
          delivery = self._collect(state, busy)
      except Exception as e:  # pylint: disable=broad-except
        # A failure of the program fails the requests it was serving; the engine starts over with empty rows.
        with self._cond:
          for owner in self._owners + (delivery[0] if delivery is not None else []):
            if owner is not None:
              self._finish(owner[0], e)
          self._owners = [None] * self.rows
          self._positions[:] = self.decoder.block_size
        state, delivery = self.decoder.empty_state(), None
    with self._cond:
      for ticket in {o[0] for o in self._owners if o is not None} | set(self._waiting):
        self._finish(ticket, Cancelled("the server is shutting down"))

  def _sweep(self) -> None:
    """Frees the rows of cancelled tickets and admits waiting images (called with the lock held)."""
    cancelled = set()
    for row, owner in enumerate(self._owners):
      if owner is not None and owner[0].cancelled:
        cancelled.add(owner[0])
        self._owners[row], self._positions[row] = None, self.decoder.block_size
    for ticket in [t for t in self._waiting if t.cancelled]:
      cancelled.add(ticket)
      self._waiting.remove(ticket)
    for ticket in cancelled:
      self._finish(ticket, Cancelled("the request was cancelled"))
    self._admit()

  def _collect(self, state: row_decoding.RowState, busy: np.ndarray) -> tuple[list[tuple[Ticket, int]], Any] | None:
    """Waits for the chunk; frees the rows it finished and starts decoding their images."""
    jax.block_until_ready(state.tokens)
    with self._cond:
      self._positions[busy] = np.minimum(self._positions[busy] + self.chunk, self.decoder.block_size)
      finished = [row for row in np.flatnonzero(busy) if self._positions[row] == self.decoder.block_size
                  and self._owners[row] is not None]
      owners = [self._owners[row] for row in finished]
      for row in finished:
        self._owners[row] = None
    if not finished:
      return None
    tokens = np.asarray(state.tokens)[finished]
    size = next(size for size in self._decode_buckets if size >= len(finished))
    return owners, self._decode[size](tokens)

  def _deliver(self, owners: list[tuple[Ticket, int]], decoded: Any) -> None:
    images = image_io.to_uint8(np.asarray(decoded))
    with self._cond:
      for (ticket, index), image in zip(owners, images):
        if ticket.done:
          continue
        ticket.images[index] = image
        ticket.left -= 1
        if ticket.left == 0:
          self._finish(ticket)
