"""The Debian packages some tests need. A missing one fails the test that needs it, with the line that installs it
(CI installs them, and so does the README's first command): a test that skips when its input is missing would pass
a suite that checked nothing."""

import pytest


def require(package: str, present: bool) -> None:
  if not present:
    pytest.fail(f"{package} is not installed: apt-get install {package} (CI and the README's first command install "
                "it)")
