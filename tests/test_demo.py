"""The sampling page (`python -m npp_jax.demo`): its sampler against the plain Sampler, and the page itself served
over a tiny trained checkpoint and used through Debian's headless Chromium, as a person would.

Needs Gradio and selenium (`pip install -e '.[test]'`) and Debian's chromium and chromium-driver; without them the
browser test fails with a sentence saying what to install.
"""

import base64
import contextlib
import io
import json
import os
import pathlib
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image
from absl import flags

from npp_jax import assets
from npp_jax import demo
from npp_jax import sample as sample_cli
from npp_jax import sharding
from npp_jax.config import load_file as load_config_file
from npp_jax.model_files import store
from npp_jax.models import vq as vq_lib
from npp_jax.sampling import decoding
from npp_jax.serving import engine as engine_lib
from npp_jax.trainers import gpt_trainer
from test_main_cli import cli_env
from test_pipeline import write_codes
from test_sample_cli import fake_decode, tiny_gpt  # noqa: F401 (a fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = pathlib.Path("/usr/bin/chromium"), pathlib.Path("/usr/bin/chromedriver")
CLASS_NAMES = ["shirt", "boot", "bag"]
GUIDANCE = 2.5  # the test checkpoint's config.sample.cfg_scale, which the page must offer as the default


# -- the sampler behind the page ------------------------------------------------------------------------------


def test_the_page_and_sample_give_the_same_images_by_default(tiny_gpt, tmp_path):  # noqa: F811
  """Image i of a request is image i of `sample --labels c,c,... --seed s`: one sampling path, one default dtype."""
  for module in (demo, sample_cli):
    fv = flags.FlagValues()
    module.define_flags(fv, [module.__name__])
    assert fv["dtype"].default is None  # the model config's dtype in both
  settings = decoding.SamplingSettings(cfg_scale=2.0, temperature=0.9, top_k=20)
  with engine_lib.Engine(decoding.Sampler(tiny_gpt), jax.jit(fake_decode), rows=8, max_images=4,
                         max_pending=4) as engine:
    shown = engine.images(engine_lib.ImageRequest(1, 3, 5, settings))
  npz = sample_cli.run(tiny_gpt, jax.jit(fake_decode), [1, 1, 1], sample_cli.RunSettings(sampling=settings, seed=5),
                       tmp_path, progress=False)
  with np.load(npz) as written:
    np.testing.assert_array_equal(written["arr_0"], shown)
    assert str(written["dtype"]) == tiny_gpt.cfg.dtype


def test_class_names_come_from_the_manifest(tmp_path):
  config = load_config_file(str(REPO / "configs" / "tiny.py"))
  assert demo.class_names(config, str(tmp_path)) == []  # no codes: ids only
  write_codes(tmp_path / "codes", np.zeros((3, 1, 16), np.uint16), [0, 1, 2], class_names=CLASS_NAMES)
  assert demo.class_names(config, str(tmp_path)) == CLASS_NAMES  # WORKDIR/codes
  config.data.codes_dir = str(tmp_path / "codes")
  assert demo.class_names(config, str(tmp_path / "elsewhere")) == CLASS_NAMES  # data.codes_dir
  assert demo.class_choices(4, CLASS_NAMES) == [("0: shirt", 0), ("1: boot", 1), ("2: bag", 2), ("3", 3)]


# -- the command line -----------------------------------------------------------------------------------------


def run_demo(*args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
  """`python -m npp_jax.demo ARGS`, after running `prelude` in the same interpreter."""
  code = "; ".join(["import runpy, sys", prelude, f"sys.argv = ['demo', *{list(args)!r}]",
                    "runpy.run_module('npp_jax.demo', run_name='__main__')"])
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 1, result.stdout + result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def test_command_line_errors_are_one_line(tmp_path):
  vq = str(assets.FASHION_TOKENIZER)
  assert "the demo needs Gradio, an optional extra: pip install -e '.[demo]'" in one_line_error(
      run_demo("--checkpoint", str(tmp_path), "--vq", vq, prelude="sys.modules['gradio'] = None"))
  assert f"checkpoint {tmp_path / 'nope'} does not exist" in one_line_error(
      run_demo("--checkpoint", str(tmp_path / "nope"), "--vq", vq, "--port", str(free_port())))
  assert "--vq is required" in one_line_error(run_demo("--checkpoint", str(tmp_path)))
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert f"cannot serve on 127.0.0.1:{port}" in one_line_error(
        run_demo("--checkpoint", str(tmp_path), "--vq", vq, "--port", str(port)))


# -- the page in a browser ------------------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def require_browser():
  """Fails (not skips) with what to install: the page is the point of the demo."""
  missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
  if missing:
    pytest.fail(f"the demo test drives Debian's headless Chromium ({', '.join(missing)} missing): "
                "apt-get install chromium chromium-driver")
  for module in ("gradio", "selenium"):
    try:
      __import__(module)
    except ImportError:
      pytest.fail(f"the demo test needs {module}: pip install -e '.[test]'")


@contextlib.contextmanager
def serve(checkpoint_dir, vq_dir, *flags: str, fast_compile: bool = True, timeout: float = 300):
  """Runs the demo on a free local port until the block ends; yields (its address, its output so far) once it
  says it serves. fast_compile: one CPU device and XLA's cheapest optimisation level (quick to compile, slow to
  run: fine for a tiny model)."""
  port = free_port()
  env = cli_env() if fast_compile else {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "npp_jax.demo", "--checkpoint", str(checkpoint_dir), "--vq",
                           str(vq_dir), "--port", str(port), "--api_port", str(free_port()), *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
  url, seen, deadline = f"http://127.0.0.1:{port}", [], time.time() + timeout
  try:
    while not any(line.startswith(f"serving on {url}") for line in seen):
      if proc.poll() is not None or time.time() > deadline:
        pytest.fail("the demo did not start:\n" + "".join(seen + list(lines.queue)))
      with contextlib.suppress(queue.Empty):
        seen.append(lines.get(timeout=1))
    yield url, seen
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900):
  """Headless Debian Chromium through its chromedriver, kept off every network but loopback."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top

  options = webdriver.ChromeOptions()
  options.binary_location = str(CHROMIUM)
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-default-apps",
              # Anything not on loopback goes to a closed local port and fails at once.
              "--proxy-server=http://127.0.0.1:9"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
  try:
    yield driver
  finally:
    driver.quit()


class Page:
  """The demo page as a person uses it: pick, type, click, read."""

  def __init__(self, driver, url: str, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

    self.driver, self.url = driver, url
    self.wait = WebDriverWait(driver, timeout)
    driver.get(url)
    self.wait.until(lambda d: self._all("#generate"))

  def _all(self, css: str):
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
    return self.driver.find_elements(By.CSS_SELECTOR, css)

  def value(self, field: str) -> str:
    return self._all(f"#{field} input")[0].get_attribute("value")

  def choose_class(self, text: str) -> None:
    self._all("#label input")[0].click()
    self.wait.until(lambda d: self._all(f'#label li[role=option][aria-label="{text}"]'))[0].click()
    assert self.value("label") == text

  def enter(self, field: str, value) -> None:
    from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
    box = self._all(f"#{field} input")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)

  def status(self) -> str:
    return self._all("#status textarea")[0].get_attribute("value")

  def generate(self, expected_status: str) -> str:
    """Clicks Generate and waits for a status line that starts with `expected_status`; returns the line."""
    self._all("#generate")[0].click()
    self.wait.until(lambda d: self.status().startswith(expected_status))
    return self.status()

  def grid(self) -> np.ndarray | None:
    """The grid the browser shows (None when it shows none), checked to have loaded at its own size."""
    shown = self._all("#grid img")
    if not shown:
      return None
    self.wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                               shown[0]))
    src = shown[0].get_attribute("src")
    assert src.startswith(self.url + "/"), src
    with urllib.request.urlopen(src, timeout=30) as response:
      image = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    size = self.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", shown[0])
    assert size == [image.shape[1], image.shape[0]]
    return image


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> pathlib.Path:
  """A 1-layer GPT trained for 2 steps on random codes of the shipped tokenizer, with named classes."""
  root = tmp_path_factory.mktemp("demo")
  vq_cfg, _ = store.read_saved_vq(assets.FASHION_TOKENIZER)
  grid = vq_lib.grid_size(vq_cfg)
  views = np.random.default_rng(0).integers(0, vq_cfg.codebook_size, (12, 1, grid * grid)).astype(np.uint16)
  codes = write_codes(root / "codes", views, [i % 3 for i in range(12)], vocab=vq_cfg.codebook_size, grid=grid,
                      num_classes=3, shards=1, class_names=CLASS_NAMES)
  config = load_config_file(str(REPO / "configs" / "tiny.py"))
  config.model.update(dim=32, n_layer=1, n_head=2, vocab_size=vq_cfg.codebook_size, num_classes=3,
                      block_size=grid * grid)
  config.vq = vq_cfg
  config.vq.checkpoint = ""  # the demo is given the tokenizer; the trainer needs none for prepared codes
  config.npp.stages = ((1, 1.0),)
  config.data.update(kind="codes", codes_dir=str(codes))
  config.train.update(global_batch_size=4, total_steps=2, log_every=1, checkpoint_every=2)
  config.optim.warmup_steps = 1
  config.sample.cfg_scale = GUIDANCE
  gpt_trainer.run(config, str(root / "run"), mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  return root / "run"


def check_grid(image: np.ndarray, count: int) -> list[np.ndarray]:
  """`count` 32x32 images shown at 4x (128 px) in a 2x2 grid 2 px apart: 258x258, gaps and empty cells black."""
  assert image.shape == (258, 258, 3)
  assert not image[128:130].any() and not image[:, 128:130].any()
  cells = [image[r:r + 128, c:c + 128] for r in (0, 130) for c in (0, 130)]
  for cell in cells[:count]:
    blocks = cell.reshape(32, 4, 32, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # each source pixel is a 4x4 block
    assert cell.any()
  assert not any(cell.any() for cell in cells[count:])
  return cells[:count]


def test_the_page_in_a_browser(trained_checkpoint):
  require_browser()
  with serve(trained_checkpoint, assets.FASHION_TOKENIZER, "--max_images", "4") as (url, log):
    assert any(line.startswith("compiling the sampler") for line in log)
    with browser() as driver:
      page = Page(driver, url)
      assert float(page.value("cfg_scale")) == GUIDANCE
      page.choose_class("2: bag")
      page.enter("num_images", 3)
      page.enter("seed", 3)
      status = page.generate("3 images of class 2 (bag), seed 3, in ")
      assert status.endswith(" s")
      first = page.grid()
      cells = check_grid(first, 3)
      assert not np.array_equal(cells[0], cells[1])
      # The JSON API beside the page serves the same images at their own size.
      api = next(line.split()[-1] for line in log if line.startswith("JSON API on "))
      request = urllib.request.Request(api, data=json.dumps({"class": 2, "images": 3, "seed": 3,
                                                             "format": "images"}).encode())
      with urllib.request.urlopen(request, timeout=60) as response:
        shown = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in json.load(response)["images"]]
      for cell, image in zip(cells, shown, strict=True):
        np.testing.assert_array_equal(cell[::4, ::4], image)

      page.enter("seed", 4)
      page.generate("3 images of class 2 (bag), seed 4, in ")
      other = page.grid()
      check_grid(other, 3)
      assert not np.array_equal(other, first)

      page.enter("seed", 3)
      page.generate("3 images of class 2 (bag), seed 3, in ")
      np.testing.assert_array_equal(page.grid(), first)

      page.enter("top_p", 1.5)
      with pytest.raises(ValueError) as expected:
        decoding.SamplingSettings(cfg_scale=GUIDANCE, top_p=1.5).validate()
      assert page.generate("error: ") == f"error: {expected.value}"
      assert page.grid() is None
      assert "Traceback" not in driver.page_source
