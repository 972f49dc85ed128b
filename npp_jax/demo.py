"""A local web page over a checkpoint, and a JSON API beside it: pick a class, guidance, temperature, top-k, top-p and
a seed, see the grid.

  python -m npp_jax.demo --checkpoint runs/fashion --vq npp_jax/assets/vq_fashion [--host 127.0.0.1 --port 7860]
  curl -d '{"class": 9, "images": 4, "seed": 0}' http://127.0.0.1:7861/sample -o grid.png

Needs Gradio for the page (`pip install -e '.[demo]'`); --nopage serves the API alone, without it. Requests from
everyone share one compiled batch of --rows rows (`npp_jax.serving.engine`): each row carries its own class, seed and
settings, so no mix of settings recompiles, and with --schedule join a request that arrives mid-batch takes free
rows at the next chunk boundary. Past --max_pending unfinished requests a new one is told the server is busy at once.
Image i of a request is image i of `python -m npp_jax.sample --labels c,c,... --seed s` with the same settings: both
compute in the model config's dtype, and each sample's key is fold_in(sample_key(seed), i), whatever the batch.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import socket
import sys
import threading
import time
from typing import Any

import numpy as np
from absl import flags

from npp_jax import cli
from npp_jax import errors
from npp_jax import images as image_io
from npp_jax.sampling import decoding
from npp_jax.sampling import generation
from npp_jax.serving import engine as engine_lib
from npp_jax.serving import http_api

DISPLAY_SIDE = 128  # small images are enlarged by a whole factor to at least this many pixels, so cells stay sharp
GRID_PAD = 2
INSTALL_HINT = "pip install -e '.[demo]'"


# ----------------------------------------------------------------------------------------------------------------------
# What the page shows, without the page.


def class_names(config: Any, checkpoint_dir: str) -> list[str]:
  """Class names from the training data's manifest (data.codes_dir, else WORKDIR/codes), or [] when unknown."""
  from npp_jax.data import records  # pylint: disable=g-import-not-at-top

  data = config.get("data") or {}
  codes = pathlib.Path(data.get("codes_dir") or pathlib.Path(checkpoint_dir) / "codes")
  if not (codes / records.MANIFEST).is_file():
    return []
  return list(records.Manifest.read(codes).class_names)


def class_choices(num_classes: int, names: list[str]) -> list[tuple[str, int]]:
  """(shown text, class id) for the class picker: "3: dress" where the name is known, "3" otherwise."""
  return [(f"{i}: {names[i]}" if i < len(names) else str(i), i) for i in range(num_classes)]


def enlarge(images: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
  """Nearest-neighbour upscaling of (N, H, W, C) by the smallest whole factor that makes H at least `side`."""
  factor = max(1, math.ceil(side / images.shape[1]))
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


# ----------------------------------------------------------------------------------------------------------------------
# The page.


def _whole(name: str, value: Any) -> int:
  """A form field that must hold a whole number, as an int."""
  value = _given(name, value)
  if not float(value).is_integer():
    raise errors.InvalidInput(f"the {name} must be a whole number, got {value}")
  return int(value)


def _given(name: str, value: Any) -> Any:
  if value is None or value == "":
    raise errors.InvalidInput(f"the {name} field is empty; enter a number")
  return value


def build_page(engine: engine_lib.Engine, names: list[str], defaults: decoding.SamplingSettings, title: str):
  """The Gradio page; each request shows the grid and one status line (the time, or the error sentence)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top

  choices = class_choices(engine.num_classes, names)

  def generate(label, num_images, cfg_scale, temperature, top_k, top_p, seed):
    try:
      label, num_images, seed = _whole("class", label), _whole("number of images", num_images), _whole("seed", seed)
      settings = decoding.SamplingSettings(cfg_scale=float(_given("guidance scale", cfg_scale)),
                                           temperature=float(_given("temperature", temperature)),
                                           top_k=_given("top-k", top_k), top_p=float(_given("top-p", top_p)))
      started = time.perf_counter()
      images = engine.images(engine_lib.ImageRequest(label, num_images, seed, settings))
      seconds = time.perf_counter() - started
    except errors.UserError as e:
      return None, f"error: {e}"  # the sampler's sentence, and no stale grid beside it
    grid = image_io.square_grid(enlarge(images), pad=GRID_PAD)
    named = f" ({names[label]})" if label < len(names) else ""
    return grid, f"{num_images} images of class {label}{named}, seed {seed}, in {seconds:.2f} s"

  # Each grid is a PNG in Gradio's cache; files older than an hour are deleted every ten minutes.
  with gr.Blocks(title="npp-jax sampler", analytics_enabled=False, delete_cache=(600, 3600)) as page:
    gr.Markdown(f"### {title}")
    with gr.Row():
      with gr.Column(scale=1):
        label = gr.Dropdown(choices, value=choices[0][1], label="class", elem_id="label")
        num_images = gr.Slider(1, engine.max_images, value=min(8, engine.max_images), step=1,
                               label="number of images", elem_id="num_images")
        cfg_scale = gr.Slider(1.0, max(10.0, defaults.cfg_scale), value=defaults.cfg_scale, step=0.05,
                              label="guidance scale (1 = none)", elem_id="cfg_scale")
        temperature = gr.Number(defaults.temperature, label="temperature", elem_id="temperature")
        top_k = gr.Number(defaults.top_k, label="top-k (0 keeps every token)", elem_id="top_k")
        top_p = gr.Number(defaults.top_p, label="top-p (1 keeps every token)", elem_id="top_p")
        seed = gr.Number(0, label="seed", elem_id="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column(scale=2):
        grid = gr.Image(label="samples", type="numpy", format="png", interactive=False,
                        buttons=["download", "fullscreen"], elem_id="grid")
        status = gr.Textbox(label="status", interactive=False, elem_id="status")
    # Every request goes straight to the engine, which batches them and answers "busy" past its own limit.
    button.click(generate, [label, num_images, cfg_scale, temperature, top_k, top_p, seed], [grid, status],
                 api_name="generate", concurrency_limit=None)
  return page.queue(default_concurrency_limit=None)


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def check_port_free(host: str, port: int) -> None:
  """A ValueError unless the server could bind host:port now (it binds with SO_REUSEADDR too)."""
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(address)
  except OSError as e:
    raise errors.InvalidInput(f"cannot serve on {host}:{port} ({e.strerror or e}); pass another --host or a free --port"
                              ) from None


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # no --config: the page samples with the checkpoint's own
  flags.DEFINE_string("checkpoint", None, "Trainer workdir or converted model directory.", flag_values=fv)
  flags.DEFINE_string("vq", None, "VQ tokenizer: a save_vq directory, .pt or .safetensors file.", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Address to serve the page and the API on (0.0.0.0 serves every network "
                      "interface).", flag_values=fv)
  flags.DEFINE_integer("port", 7860, "Port of the page.", lower_bound=1, upper_bound=65535, flag_values=fv)
  flags.DEFINE_integer("api_port", 7861, "Port of the JSON API (POST /sample, GET /info); 0: no API.",
                       lower_bound=0, upper_bound=65535, flag_values=fv)
  flags.DEFINE_bool("page", True, "Serve the Gradio page (--nopage: the JSON API alone, no Gradio needed).",
                    flag_values=fv)
  flags.DEFINE_integer("max_images", 16, "Most images per request (more than --rows take several batches).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("rows", 16, "Rows of the compiled batch that every request shares (a multiple of the device "
                       "count).", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("schedule", "join", engine_lib.SCHEDULES, "When a free row takes a waiting image: at every "
                    "chunk boundary (join), once the whole batch is done (batch), or one request per batch (single, "
                    "the baseline).", flag_values=fv)
  flags.DEFINE_integer("chunk", 8, "Tokens decoded between two chances for waiting images to join.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("max_pending", 64, "Most unfinished requests; past it a request is told the server is busy.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("dtype", None, decoding.COMPUTE_DTYPES, "Compute dtype (default: the model config's).",
                    flag_values=fv)


def _url(host: str, port: int, path: str = "") -> str:
  host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
  return f"http://{host}:{port}{path}"


def serve(fv: flags.FlagValues) -> None:
  """Loads, compiles, then serves until Ctrl+C."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check or telemetry calls home
  if not fv.page and not fv.api_port:
    raise errors.InvalidInput("--nopage with --api_port=0 would serve nothing; keep the page or give an API port")
  if fv.page and importlib.util.find_spec("gradio") is None:
    raise errors.UserError(f"the demo needs Gradio, an optional extra: {INSTALL_HINT} (or --nopage serves the JSON "
                           "API alone)")
  for port in ([fv.port] if fv.page else []) + ([fv.api_port] if fv.api_port else []):
    check_port_free(fv.host, port)  # before loading, which can take minutes for a large model
  print(f"loading {fv.checkpoint} and the tokenizer {fv.vq}", flush=True)
  model, config, decode = generation.load_model_and_tokenizer(fv.checkpoint, fv.vq)
  engine = engine_lib.Engine(decoding.Sampler(model, dtype=fv.dtype), decode, rows=fv.rows,
                             max_images=fv.max_images, max_pending=fv.max_pending, schedule=fv.schedule,
                             chunk=fv.chunk)
  defaults = decoding.SamplingSettings.from_config(config.get("sample")).validate(model.cfg.vocab_size)
  names = class_names(config, fv.checkpoint)
  if not names:
    print("note: the checkpoint names no data manifest; classes are shown by id", flush=True)
  print(f"compiling the sampler and the tokenizer for a shared batch of {fv.rows} rows (once) ...", flush=True)
  started = time.perf_counter()
  engine.warm_up()
  print(f"compiled in {time.perf_counter() - started:.1f} s", flush=True)
  engine.start()

  if fv.api_port:
    try:
      api = http_api.Server((fv.host, fv.api_port), engine, defaults, names)
    except OSError as e:
      raise errors.InvalidInput(f"cannot serve on {fv.host}:{fv.api_port} ({e}); pass a free --api_port") from None
    api.serve_in_thread()
    line = "serving the JSON API" if not fv.page else "JSON API"
    print(f"{line} on {_url(fv.host, fv.api_port, '/sample')}{'' if fv.page else ' (Ctrl+C stops)'}", flush=True)
  if fv.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"note: {fv.host} is reachable from other machines; anyone who can reach it can use the page and the API",
          flush=True)
  if not fv.page:
    threading.Event().wait()  # until Ctrl+C

  title = f"{fv.checkpoint}: {model.cfg.num_classes} classes, {model.cfg.block_size} tokens per image"
  page = build_page(engine, names, defaults, title)
  try:
    # Gradio runs each waiting request in a worker thread: enough for every request the engine takes.
    page.launch(server_name=fv.host, server_port=fv.port, prevent_thread_lock=True, quiet=True, share=False,
                ssr_mode=False, show_error=False, max_threads=fv.max_pending + 8)
  except OSError as e:
    raise errors.InvalidInput(f"cannot serve on {fv.host}:{fv.port} ({e}); pass a free --port") from None
  print(f"serving on {_url(fv.host, fv.port)} (Ctrl+C stops)", flush=True)
  page.block_thread()


def main(argv: list[str] | None = None) -> int:
  return cli.main(serve, define_flags, argv, doc=__doc__, required=("checkpoint", "vq"))


if __name__ == "__main__":
  sys.exit(main())
