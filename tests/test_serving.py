"""The shared batch behind the page and the HTTP API: per-row filters, rows decoding at their own positions, the
engine's schedules, queue bound and cancellation, the JSON API over loopback, and a small load test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import images as image_io
from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.serving import engine as engine_lib
from npp_jax.serving import row_decoding
from test_sample_cli import CLASSES, VOCAB, fake_decode, tiny_gpt  # noqa: F401 (a fixture)

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


def expected_tokens(model, label: int, seed: int, index: int, settings) -> np.ndarray:
  """Sample `index` of `sample --labels ... --seed seed`: the plain sampler, alone, at that sample offset."""
  return np.asarray(decoding.Sampler(model, dtype="float32")([label], generation.sample_key(seed), settings,
                                                             sample_offset=index))[0]


def test_rows_at_different_positions_draw_the_plain_samplers_tokens(tiny_gpt):  # noqa: F811
  sampler = decoding.Sampler(tiny_gpt, dtype="float32")
  decoder = row_decoding.RowDecoder(sampler, rows=8)
  seq_len = decoder.block_size
  # (label, seed, sample index, settings) per row; rows 4-7 join after 5 steps, with rows 0-3 mid-sample.
  plan = [(0, 1, 0, "A"), (1, 1, 1, "B"), (2, 7, 3, "C"), (1, 2**32 - 1, 0, "D"),
          (2, 1, 0, "B"), (0, 5, 2, "A"), (0, 9, 0, "D"), (2, 7, 3, "C")]
  settings = row_decoding.empty_row_settings(8)
  positions = np.full(8, seq_len, np.int32)
  for row, (label, seed, index, name) in enumerate(plan):
    row_decoding.set_row(settings, row, label, row_decoding.sample_key_data(generation.sample_key(seed), index, 1)[0],
                         MIXED[name])
  state = decoder.empty_state()
  positions[:4] = 0
  state = decoder.advance(state, settings, positions, steps=5)
  positions = np.minimum(positions + 5, seq_len)
  positions[4:] = 0
  while (positions < seq_len).any():
    state = decoder.advance(state, settings, positions, steps=4)
    positions = np.minimum(positions + 4, seq_len)
  tokens = np.asarray(state.tokens)
  for row, (label, seed, index, name) in enumerate(plan):
    np.testing.assert_array_equal(tokens[row], expected_tokens(tiny_gpt, label, seed, index, MIXED[name]), str(row))
  np.testing.assert_array_equal(tokens[2], tokens[7])  # the same sample in two rows, started 5 steps apart
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
