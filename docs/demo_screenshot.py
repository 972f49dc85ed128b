"""Takes docs/demo.png: the sampling page over a checkpoint, driven by the browser test's own helpers.

  python docs/demo_screenshot.py [--checkpoint runs/fashion] [--vq npp_jax/assets/vq_fashion] [--label "9: Ankle boot"]

Paths are relative to the repository root. Needs what tests/test_demo.py needs (Debian's chromium and
chromium-driver, `pip install -e '.[test]'`).
"""

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's npp_jax, and the test helpers

import test_demo  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", default="runs/fashion")
  p.add_argument("--vq", default="npp_jax/assets/vq_fashion")
  p.add_argument("--label", default="9: Ankle boot", help="the class picker's text for the class to show")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(REPO / "docs" / "demo.png"))
  args = p.parse_args()
  with test_demo.serve(args.checkpoint, args.vq, fast_compile=False) as (url, _):
    with test_demo.browser(width=1280, height=1000) as driver:
      page = test_demo.Page(driver, url)
      page.choose_class(args.label)
      page.enter("num_images", 16)
      page.enter("seed", args.seed)
      print(page.generate("16 images of class "))
      page.grid()  # waits until the browser has loaded it
      driver.execute_script("window.scrollTo(0, 0)")  # clicking Generate scrolled the page
      driver.save_screenshot(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
