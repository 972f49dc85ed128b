"""Paths of the models shipped with the package (light: configs import it for these paths alone)."""

import pathlib

ASSETS_DIR = pathlib.Path(__file__).resolve().parent
# The Fashion-MNIST tokenizer (a store.save_vq directory, written by npp_jax.train_tokenizer; see its README).
FASHION_TOKENIZER = ASSETS_DIR / "vq_fashion"
# The Fashion-MNIST classifier of the online metric (a store.save_classifier directory; see its README).
FASHION_CLASSIFIER = ASSETS_DIR / "fashion_classifier"
