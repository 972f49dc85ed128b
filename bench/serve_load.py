"""Load test of the sampling server's JSON API: N concurrent clients for a fixed time, per schedule, in one run.

  python bench/serve_load.py --checkpoint runs/fashion --vq npp_jax/assets/vq_fashion \
      [--clients 1,4,32] [--seconds 30] [--schedules single,batch,join] [--rows 16] [--chunk 8]
  python bench/serve_load.py --url http://127.0.0.1:7861 [--clients 32]   # a server already running, as it is

For each schedule it starts `python -m npp_jax.demo --nopage` on 127.0.0.1 (a free port) with that --schedule and
waits for it to compile; then, for each client count, the clients send requests one after another for --seconds
(the requests in flight at the end are waited for and counted). Requests are mixed: 1-4 images of a random class,
guidance 1, 2 or 3, temperature 0.9-1.1, top-k off or 50, top-p off or 0.95, a random seed (the mix is the same in
every run for a given --seed). It prints, per schedule and client count, images/s, requests, p50/p95/p99 latency,
errors and busy answers; then each schedule's images/s over `single`'s (the page before batches were shared) at the
most clients, and its p95 at 4 clients over its p95 with 1 (a lone request); then a burst of 2 x max_pending
requests at once, of which the excess must be told "busy" at once. Traffic goes to the loopback address only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REQUEST_TIMEOUT = 600.0


@dataclasses.dataclass
class LoadResult:
  """What the clients saw: completed requests' latencies (s) and image counts, errors and busy answers."""

  clients: int
  seconds: float = 0.0  # from the first request to the last answer
  latencies: list[float] = dataclasses.field(default_factory=list)
  images: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)
  busy: int = 0

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds else 0.0

  def percentile(self, q: float) -> float:
    return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def check_loopback(url: str) -> str:
  """The URL without a trailing slash; ValueError unless its host is a loopback address."""
  host = urllib.parse.urlsplit(url).hostname
  if host not in LOOPBACK:
    raise ValueError(f"the load test only sends traffic to the loopback address, not {host}")
  return url.rstrip("/")


def get_info(url: str) -> dict[str, Any]:
  with urllib.request.urlopen(f"{check_loopback(url)}/info", timeout=30) as answer:
    return json.load(answer)


def random_request(rng: np.random.Generator, info: dict[str, Any]) -> dict[str, Any]:
  """A mixed request: 1-4 images (at most the server's limit), any class, any of a few settings."""
  return {"class": int(rng.integers(info["classes"])), "images": int(rng.integers(1, min(4, info["max_images"]) + 1)),
          "seed": int(rng.integers(2**32)), "cfg_scale": float(rng.choice([1.0, 2.0, 3.0])),
          "temperature": round(float(rng.uniform(0.9, 1.1)), 3),
          "top_k": int(rng.choice([0, min(50, info["vocab_size"])])), "top_p": float(rng.choice([1.0, 0.95]))}


def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
  """(HTTP status, body) of POST url/sample."""
  data = json.dumps(body).encode()
  request = urllib.request.Request(f"{url}/sample", data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as answer:
      return answer.status, answer.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def run_clients(url: str, clients: int, seconds: float, *, seed: int = 0, info: dict[str, Any] | None = None
                ) -> LoadResult:
  """`clients` threads, each sending random requests back to back until `seconds` have passed."""
  url = check_loopback(url)
  info = info or get_info(url)
  result, lock = LoadResult(clients), threading.Lock()
  started = time.perf_counter()
  deadline = started + seconds

  def client(index: int) -> None:
    rng = np.random.default_rng([seed, index])
    while time.perf_counter() < deadline:
      body = random_request(rng, info)
      sent = time.perf_counter()
      try:
        status, answer = post(url, body)
      except OSError as e:
        status, answer = 0, str(e).encode()
      latency = time.perf_counter() - sent
      with lock:
        if status == 200:
          result.latencies.append(latency)
          result.images += body["images"]
        elif status == 429:
          result.busy += 1
        else:
          result.errors.append(f"{status}: {answer[:200].decode(errors='replace')}")

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  result.seconds = time.perf_counter() - started
  return result


def burst(url: str, count: int, info: dict[str, Any]) -> tuple[int, int, float]:
  """`count` requests sent at once: (answered 200, answered busy, slowest busy answer in s); anything else is an
  error of the server, raised."""
  rng, results, lock = np.random.default_rng(1), [], threading.Lock()
  bodies = [random_request(rng, info) for _ in range(count)]
  gate = threading.Barrier(count)

  def send(body):
    gate.wait()
    sent = time.perf_counter()
    try:
      status, _ = post(url, body)
    except OSError:
      status = 0  # no answer at all
    with lock:
      results.append((status, time.perf_counter() - sent))

  threads = [threading.Thread(target=send, args=(body,), daemon=True) for body in bodies]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  busy = [seconds for status, seconds in results if status == 429]
  others = sorted({status for status, _ in results} - {200, 429})
  if others:
    raise RuntimeError(f"a burst of {count} requests got answers other than 200 and 429: {others}")
  return sum(status == 200 for status, _ in results), len(busy), max(busy, default=0.0)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def server(args: argparse.Namespace, schedule: str, timeout: float = 900) -> Iterator[str]:
  """`python -m npp_jax.demo --nopage` with this schedule on 127.0.0.1; yields its URL once it serves."""
  port = free_port()
  command = [sys.executable, "-m", "npp_jax.demo", "--nopage", "--host", "127.0.0.1", "--api_port", str(port),
             "--checkpoint", args.checkpoint, "--vq", args.vq, "--schedule", schedule, "--rows", str(args.rows),
             "--chunk", str(args.chunk), "--max_pending", str(args.max_pending), *args.server_flags]
  proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
  url, seen, deadline = f"http://127.0.0.1:{port}", [], time.time() + timeout
  try:
    while not any(line.startswith("serving the JSON API") for line in seen):
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError("the server did not start:\n" + "".join(seen + list(lines.queue)))
      with contextlib.suppress(queue.Empty):
        seen.append(lines.get(timeout=1))
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def table_row(name: str, result: LoadResult) -> str:
  ms = lambda q: f"{1000 * result.percentile(q):8.0f}"
  return (f"| {name:8s} | {result.clients:7d} | {result.images_per_second:8.2f} | {len(result.latencies):8d} | "
          f"{ms(50)} | {ms(95)} | {ms(99)} | {len(result.errors):6d} | {result.busy:4d} |")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", help="model directory the servers load (not with --url)")
  p.add_argument("--vq", default=str(REPO / "npp_jax" / "assets" / "vq_fashion"))
  p.add_argument("--url", help="a running server's JSON API (loopback only); measures it as it is")
  p.add_argument("--clients", default="1,4,32", help="comma-separated client counts")
  p.add_argument("--seconds", type=float, default=30.0, help="how long each client count sends requests")
  p.add_argument("--schedules", default="single,batch,join", help="the servers' --schedule values to compare")
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--chunk", type=int, default=8)
  p.add_argument("--max_pending", type=int, default=64)
  p.add_argument("--server_flags", nargs="*", default=[], help="more flags for the servers (e.g. --dtype float32)")
  p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
  args = p.parse_args()
  counts = [int(c) for c in args.clients.split(",")]
  if (args.url is None) == (args.checkpoint is None):
    p.error("give exactly one of --checkpoint (start servers) and --url (measure a running one)")

  print("| schedule | clients | images/s | requests |  p50 ms |  p95 ms |  p99 ms | errors | busy |")
  print("|----------|---------|----------|----------|---------|---------|---------|--------|------|")
  results: dict[tuple[str, int], LoadResult] = {}
  last_burst = None

  def measure(name: str, url: str) -> None:
    nonlocal last_burst
    info = get_info(url)
    for count in counts:
      results[name, count] = run_clients(url, count, args.seconds, seed=args.seed, info=info)
      print(table_row(name, results[name, count]), flush=True)
    last_burst = (name, 2 * info["max_pending"], *burst(url, 2 * info["max_pending"], info))

  if args.url:
    measure("as is", check_loopback(args.url))
  else:
    for schedule in args.schedules.split(","):
      with server(args, schedule) as url:
        measure(schedule, url)

  most = max(counts)
  for name in dict.fromkeys(name for name, _ in results):
    line = [f"{name}:"]
    if ("single", most) in results and name != "single":
      ratio = results[name, most].images_per_second / max(results["single", most].images_per_second, 1e-9)
      line.append(f"images/s at {most} clients {ratio:.2f}x single's")
    if (name, 4) in results and (name, 1) in results:
      line.append(f"p95 at 4 clients {results[name, 4].percentile(95) / results[name, 1].percentile(95):.2f}x "
                  "a lone request's")
    print(" ".join(line))
  name, count, ok, busy, slowest = last_burst
  print(f"burst of {count} requests at once ({name}): {ok} served, {busy} told busy, the slowest busy answer in "
        f"{1000 * slowest:.0f} ms")
  for (name, clients), result in results.items():
    for error in result.errors[:3]:
      print(f"error ({name}, {clients} clients): {error}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
