"""The shared batch behind the page and the HTTP API: per-row filters, rows decoding at their own positions, the
engine's schedules, queue bound and cancellation, the JSON API over loopback, and a small load test."""

import base64
import concurrent.futures
import contextlib
import importlib.util
import io
import json
import pathlib
import socket
import sys
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from npp_jax import images as image_io
from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.serving import engine as engine_lib
from npp_jax.serving import http_api
from npp_jax.serving import row_decoding
from test_sample_cli import CLASSES, VOCAB, fake_decode, tiny_gpt  # noqa: F401 (a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Settings that differ in every per-row field; A and C share the plain sampler's compiled program (static: guided,
# top-k 5, top-p on), B and D have their own.
MIXED = {
    "A": decoding.SamplingSettings(cfg_scale=2.0, temperature=0.9, top_k=5, top_p=0.8),
    "B": decoding.SamplingSettings(cfg_scale=1.0, temperature=1.3),
    "C": decoding.SamplingSettings(cfg_scale=3.0, cfg_interval=3, temperature=1.0, top_k=5, top_p=0.95),
    "D": decoding.SamplingSettings(cfg_scale=2.0, greedy=True),
}


def test_per_row_filters_are_the_static_filters_row_by_row():
  logits = jax.random.normal(jax.random.key(0), (6, VOCAB)) * 3
  rows = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.2, 0, 0.6), (0.9, 3, 0.9), (1.0, VOCAB, 0.99), (2.0, 1, 0.1)]
  temperature, top_k, top_p = (np.asarray(column) for column in zip(*rows))
  by_row = decoding.filter_logits_by_row(logits, temperature.astype(np.float32), top_k.astype(np.int32),
                                         top_p.astype(np.float32))
  for i, (t, k, p) in enumerate(rows):
    alone = decoding.filter_logits(logits[i:i + 1], t, k, p if p < 1 else None)
    np.testing.assert_array_equal(by_row[i:i + 1], alone)
  # No row filtering: temperature only, bit for bit.
  plain = decoding.filter_logits_by_row(logits, jnp.full(6, 0.8), jnp.zeros(6, jnp.int32), jnp.ones(6))
  np.testing.assert_array_equal(plain, decoding.filter_logits(logits, 0.8))


def expected_tokens(sampler, label: int, seed: int, index: int, settings) -> np.ndarray:
  """Sample `index` of `sample --labels ... --seed seed`: the plain sampler, alone, at that sample offset."""
  return np.asarray(sampler([label], generation.sample_key(seed), settings, sample_offset=index))[0]


def test_rows_at_different_positions_draw_the_plain_samplers_tokens(tiny_gpt):  # noqa: F811
  # bfloat16, where the order in which attention sums its chunks shows in the tokens (float32 hides most of it).
  sampler = decoding.Sampler(tiny_gpt, dtype="bfloat16")
  decoder = row_decoding.RowDecoder(sampler, rows=8)
  seq_len = decoder.block_size
  # (label, seed, sample index, settings) per row; rows 4-7 join after 4 steps, with rows 0-3 mid-sample.
  plan = [(0, 1, 0, "A"), (1, 1, 1, "B"), (2, 7, 3, "C"), (1, 2**32 - 1, 0, "D"),
          (2, 1, 0, "B"), (0, 5, 2, "A"), (0, 9, 0, "D"), (2, 7, 3, "C")]
  settings = row_decoding.empty_row_settings(8)
  positions = np.full(8, seq_len, np.int32)
  for row, (label, seed, index, name) in enumerate(plan):
    row_decoding.set_row(settings, row, label, row_decoding.sample_key_data(generation.sample_key(seed), index, 1)[0],
                         MIXED[name])
  state = decoder.empty_state()
  positions[:4] = 0
  state = decoder.advance(state, settings, positions, steps=4)
  positions = np.minimum(positions + 4, seq_len)
  positions[4:] = 0
  while (positions < seq_len).any():
    state = decoder.advance(state, settings, positions, steps=4)
    positions = np.minimum(positions + 4, seq_len)
  tokens = np.asarray(state.tokens)
  for row, (label, seed, index, name) in enumerate(plan):
    np.testing.assert_array_equal(tokens[row], expected_tokens(sampler, label, seed, index, MIXED[name]), str(row))
  np.testing.assert_array_equal(tokens[2], tokens[7])  # the same sample in two rows, started 4 steps apart
  assert len(np.unique(tokens, axis=0)) == 7


def test_speculative_settings_are_refused_by_the_shared_batch():
  settings = row_decoding.empty_row_settings(1)
  with pytest.raises(ValueError, match="speculative decoding is for `sample`"):
    row_decoding.set_row(settings, 0, 0, np.zeros(2, np.uint32), decoding.SamplingSettings(speculative_window=2))


# -- the engine -----------------------------------------------------------------------------------------------


def alone(model, request: engine_lib.ImageRequest) -> np.ndarray:
  """What `sample --labels c,c,... --seed s` writes for the request: the plain sampler, the request's images only."""
  tokens = decoding.Sampler(model, dtype="float32")([request.label] * request.num_images,
                                                     generation.sample_key(request.seed), request.settings)
  return image_io.to_uint8(np.asarray(fake_decode(tokens)))


def make_engine(model, **kwargs) -> engine_lib.Engine:
  options = dict(rows=8, max_images=12, max_pending=16, chunk=4) | kwargs
  return engine_lib.Engine(decoding.Sampler(model, dtype="float32"), jax.jit(fake_decode), **options)


def spy_on_chunks(engine: engine_lib.Engine, after=None) -> list[tuple[np.ndarray, np.ndarray]]:
  """Records (labels, positions) of every chunk the engine runs; after(call number) runs before each chunk."""
  calls, advance = [], engine.decoder.advance

  def recorded(state, settings, positions, steps):
    calls.append((settings.labels.copy(), positions.copy()))
    if after is not None:
      after(len(calls))
    return advance(state, settings, positions, steps)

  engine.decoder.advance = recorded
  return calls


# Four requests with different settings (B is larger than the batch of 8 rows): A, C, D and B's first image fill
# the first batch together.
REQUESTS = [engine_lib.ImageRequest(0, 3, 1, MIXED["A"]), engine_lib.ImageRequest(2, 2, 3, MIXED["C"]),
            engine_lib.ImageRequest(1, 2, 4, MIXED["D"]), engine_lib.ImageRequest(1, 10, 2, MIXED["B"])]


@pytest.fixture(scope="module")
def alone_images(tiny_gpt):  # noqa: F811
  return [alone(tiny_gpt, request) for request in REQUESTS]


@pytest.mark.parametrize("schedule", engine_lib.SCHEDULES)
def test_requests_sharing_the_batch_get_their_images_alone(tiny_gpt, alone_images, schedule):  # noqa: F811
  engine = make_engine(tiny_gpt, schedule=schedule)
  chunks = spy_on_chunks(engine)
  tickets = [engine.submit(request) for request in REQUESTS]  # all waiting before the engine starts
  with engine:
    for ticket, expected in zip(tickets, alone_images):
      np.testing.assert_array_equal(ticket.wait(timeout=120), expected)
  first_labels = chunks[0][0][chunks[0][1] == 0]
  if schedule == "single":  # one request per batch; B's 10 images over two batches
    np.testing.assert_array_equal(first_labels, [0, 0, 0])
    assert sum((positions == 0).sum() for _, positions in chunks) == 17
  else:
    np.testing.assert_array_equal(first_labels, [0, 0, 0, 2, 2, 1, 1, 1])


@pytest.mark.parametrize("schedule", ["join", "batch"])
def test_a_request_arriving_mid_batch_joins_it_only_when_joining(tiny_gpt, schedule):  # noqa: F811
  engine = make_engine(tiny_gpt, schedule=schedule, chunk=2)
  late = []
  chunks = spy_on_chunks(engine, after=lambda n: n == 2 and late.append(engine.submit(REQUESTS[2])))
  with engine:
    first = engine.submit(REQUESTS[0])  # 3 of the 8 rows, 8 chunks of 2 tokens
    first.wait(timeout=120)
    late[0].wait(timeout=120)
  seq_len = engine.decoder.block_size
  together = [(labels[positions < seq_len] == 1).any() and (labels[positions < seq_len] == 0).any()
              for labels, positions in chunks]
  if schedule == "join":  # it starts at the next chunk boundary, while the first request is mid-sample
    assert together[2] and sum(together) == seq_len // 2 - 2
    assert len(chunks) == seq_len // 2 + 2
  else:  # it waits for the whole batch
    assert not any(together) and len(chunks) == seq_len
  np.testing.assert_array_equal(late[0].wait(), alone(tiny_gpt, REQUESTS[2]))


def test_past_the_queue_limit_a_request_is_told_busy_at_once(tiny_gpt):  # noqa: F811
  engine = make_engine(tiny_gpt, max_pending=2)
  tickets = [engine.submit(REQUESTS[0]), engine.submit(REQUESTS[1])]
  with pytest.raises(engine_lib.Busy, match=r"the server is busy \(2 requests in progress\); try again"):
    engine.submit(REQUESTS[2])
  with engine:
    for ticket in tickets:
      ticket.wait(timeout=120)
    np.testing.assert_array_equal(engine.images(REQUESTS[2]), alone(tiny_gpt, REQUESTS[2]))  # room again


def test_a_cancelled_request_frees_its_rows_at_the_next_chunk(tiny_gpt):  # noqa: F811
  engine = make_engine(tiny_gpt, schedule="batch", chunk=2)
  big = engine_lib.ImageRequest(0, 8, 5, MIXED["A"])  # every row
  tickets = []
  chunks = spy_on_chunks(engine, after=lambda n: n == 1 and tickets[0].cancel())
  tickets += [engine.submit(big), engine.submit(REQUESTS[2])]
  with engine:
    with pytest.raises(engine_lib.Cancelled, match="the request was cancelled"):
      tickets[0].wait(timeout=120)
    np.testing.assert_array_equal(tickets[1].wait(timeout=120), alone(tiny_gpt, REQUESTS[2]))
  seq_len = engine.decoder.block_size
  # One chunk of the big request, then the waiting one at once: a batch-wide wait would take seq_len / 2 chunks.
  assert (chunks[0][1] == 0).all() and len(chunks) == 1 + seq_len // 2
  assert (chunks[1][1] < seq_len).sum() == 2


@pytest.mark.parametrize("request_, message", [
    (engine_lib.ImageRequest(0, 0, 0, MIXED["B"]), "number of images must be between 1 and 12, got 0"),
    (engine_lib.ImageRequest(0, 13, 0, MIXED["B"]), "number of images must be between 1 and 12, got 13"),
    (engine_lib.ImageRequest(0, 1, -1, MIXED["B"]), "seed must be a whole number between 0 and 4294967295, got -1"),
    (engine_lib.ImageRequest(CLASSES, 1, 0, MIXED["B"]), r"label 3 is not a class id in \[0, 3\)"),
    (engine_lib.ImageRequest(0, 1, 0, decoding.SamplingSettings(top_k=VOCAB + 1)), "vocabulary size 32"),
    (engine_lib.ImageRequest(0, 1, 0, decoding.SamplingSettings(speculative_window=2)), "speculative decoding"),
])
def test_bad_requests_are_one_sentence(tiny_gpt, request_, message):  # noqa: F811
  with pytest.raises(ValueError, match=message):
    make_engine(tiny_gpt).submit(request_)


# -- the JSON API ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def api_server(engine: engine_lib.Engine):
  """The API over `engine` on a free loopback port; yields its URL."""
  server = http_api.Server(("127.0.0.1", 0), engine, DEFAULTS, ["shirt", "boot", "bag"])
  server.serve_in_thread()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


DEFAULTS = decoding.SamplingSettings(cfg_scale=2.0, temperature=0.9, top_k=5, top_p=0.8)  # MIXED["A"]


def post(url: str, body, path: str = "/sample") -> tuple[int, str, bytes]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  try:
    with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as answer:
      return answer.status, answer.headers["Content-Type"], answer.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers["Content-Type"], e.read()


def test_the_api_serves_the_requests_images(tiny_gpt, alone_images):  # noqa: F811
  with make_engine(tiny_gpt) as engine, api_server(engine) as url:
    status, kind, grid = post(url, {"class": 0, "images": 3, "seed": 1})  # A's settings are the defaults
    assert (status, kind) == (200, "image/png")
    expected = image_io.square_grid(alone_images[0], pad=http_api.GRID_PAD)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(grid)).convert("RGB")), expected)

    body = {"class": 1, "images": 10, "seed": 2, "cfg_scale": 1, "temperature": 1.3, "top_k": 0, "top_p": 1,
            "format": "images"}  # B, over two batches
    status, kind, answer = post(url, body)
    assert (status, kind) == (200, "application/json")
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in json.loads(answer)["images"]]
    np.testing.assert_array_equal(np.stack(images), alone_images[3])

    with urllib.request.urlopen(url + "/info", timeout=60) as answer:
      info = json.load(answer)
    assert info["classes"] == CLASSES and info["class_names"][2] == "bag" and info["max_images"] == 12
    assert info["defaults"]["top_p"] == 0.8 and info["vocab_size"] == VOCAB


@pytest.mark.parametrize("body, status, sentence", [
    (b"{not json", 400, "the body is not valid JSON"),
    ([3], 400, "the body must be a JSON object"),
    ({"images": 2}, 400, "the field \"class\" (a class id) is required"),
    ({"class": 0, "colour": 1}, 400, "unknown field 'colour'"),
    ({"class": 0, "seed": 1.5}, 400, "seed must be a whole number, got 1.5"),
    ({"class": 0, "images": "2"}, 400, "images must be a number, got '2'"),
    ({"class": 0, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"class": 0, "images": 13}, 400, "the number of images must be between 1 and 12, got 13"),
    ({"class": 0, "format": "gif"}, 400, "format must be one of grid, images"),
])
def test_api_errors_are_one_sentence_with_a_4xx_status(tiny_gpt, body, status, sentence):  # noqa: F811
  with api_server(make_engine(tiny_gpt)) as url:  # never started: a valid request would wait
    answer = post(url, body)
  assert answer[:2] == (status, "application/json")
  error = json.loads(answer[2])["error"]
  assert error.startswith(sentence) and "\n" not in error


def test_api_wrong_paths_and_methods(tiny_gpt):  # noqa: F811
  with api_server(make_engine(tiny_gpt)) as url:
    assert post(url, {"class": 0}, "/generate")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as answer:
      urllib.request.urlopen(url + "/sample", timeout=60)
    assert answer.value.code == 405 and "takes a POST" in json.load(answer.value)["error"]


def test_the_api_answers_busy_at_once_past_the_queue_limit(tiny_gpt):  # noqa: F811
  engine = make_engine(tiny_gpt, max_pending=1)
  with api_server(engine) as url:
    waiting = concurrent.futures.ThreadPoolExecutor(1).submit(post, url, {"class": 0, "images": 3, "seed": 1})
    while engine._unfinished < 1:  # pylint: disable=protected-access
      time.sleep(0.01)
    try:
      with urllib.request.urlopen(urllib.request.Request(url + "/sample", data=b'{"class": 1}'), timeout=60):
        pytest.fail("a request past the queue limit was taken")
    except urllib.error.HTTPError as busy:
      assert busy.code == 429 and busy.headers["Retry-After"] == "1"
      assert json.load(busy)["error"].startswith("the server is busy (1 requests in progress); try again")
    with engine:
      assert waiting.result(timeout=120)[0] == 200


def test_a_client_that_disconnects_gives_its_request_up(tiny_gpt):  # noqa: F811
  engine = make_engine(tiny_gpt)
  chunks = spy_on_chunks(engine)
  tickets, submit = [], engine.submit
  engine.submit = lambda request: tickets.append(submit(request)) or tickets[-1]
  with api_server(engine) as url:
    body = json.dumps({"class": 2, "images": 8, "seed": 1}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
      client.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
      while not tickets:
        time.sleep(0.01)
    deadline = time.time() + 30
    while not tickets[0].cancelled and time.time() < deadline:
      time.sleep(0.01)
    assert tickets[0].cancelled
    with engine:  # its images never start, and the next request has the rows
      status, _, _ = post(url, {"class": 0, "images": 3, "seed": 1})
      assert status == 200
  assert not any((labels[positions == 0] == 2).any() for labels, positions in chunks)
  with pytest.raises(engine_lib.Cancelled):
    tickets[0].wait(timeout=0)


def test_a_small_load_test_sees_no_errors(tiny_gpt):  # noqa: F811
  serve_load = load_bench("serve_load")
  with make_engine(tiny_gpt, max_images=4) as engine, api_server(engine) as url:
    result = serve_load.run_clients(url, 3, 2.0, seed=0)
  assert result.errors == [] and result.busy == 0
  assert len(result.latencies) >= 3 and result.images >= len(result.latencies)
  assert result.images_per_second > 0 and result.percentile(50) <= result.percentile(99)
  with pytest.raises(ValueError, match="only sends traffic to the loopback address"):
    serve_load.run_clients("http://192.0.2.1:7861", 1, 0.1)


def load_bench(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # its dataclasses look their module up while it loads
  spec.loader.exec_module(module)
  return module
