"""Fashion-MNIST tokenizers compared on the 10,000 test images: how much of each garment survives the round trip.

  python bench/tokenizer_quality.py shipped=npp_jax/assets/vq_fashion l2=runs/vq_fashion_l2/tokenizer \
      gan=runs/vq_fashion_gan/tokenizer [--limit N]

For each saved tokenizer (a `store.save_vq` directory) the test images (as the pipeline sees them: centred on a
black 32x32 canvas) are encoded and decoded, and the table gives:
  psnr       mean per-image PSNR (dB) of the reconstruction clipped to [-1, 1], both mapped to [0, 1]
             (the tokenizer trainer's `per_image_psnr`);
  accuracy   the shipped classifier's accuracy on the reconstructions against the true labels (the originals'
             accuracy is printed above the table: the ceiling);
  same       the fraction of images whose reconstruction gets the same predicted class as the original;
  fd         the Frechet distance of the reconstructions' classifier features to the real test set's (the statistics
             shipped with the classifier; the originals score ~0), lower is better; with its bootstrap error.
Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from npp_jax.eval import fashion
from npp_jax.model_files import store
from npp_jax.models import vq
from npp_jax.trainers import tokenizer_trainer

BATCH = 500


def reconstruct(directory: str, images: np.ndarray) -> np.ndarray:
  model = store.load_vq(store.read_saved_vq(directory)[0])
  encode, decode = vq.make_encode_fn(model), vq.make_decode_fn(model)
  out = [np.asarray(decode(encode(images[i:i + BATCH].astype(np.float32) / 127.5 - 1.0)))
         for i in range(0, len(images), BATCH)]
  return np.concatenate(out)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("tokenizers", nargs="+", help="NAME=DIRECTORY of a saved tokenizer")
  parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
  parser.add_argument("--bootstrap", type=int, default=20, help="resamplings for the standard errors")
  args = parser.parse_args(argv)
  images, labels = fashion.load_real_images("test", limit=args.limit)
  evaluator = fashion.Evaluator()
  original_logits, _ = fashion.predict(images, evaluator.apply_fn)
  original_pred = np.argmax(original_logits, -1)
  print(f"{len(images)} test images; classifier accuracy on the originals {np.mean(original_pred == labels):.2%}")
  print("| tokenizer | PSNR (dB) | accuracy | same class as original | FD (classifier features) |")
  print("|---|---|---|---|---|")
  x = jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)
  for spec in args.tokenizers:
    name, directory = spec.split("=", 1)
    recon = reconstruct(directory, images)
    psnr = float(np.mean(tokenizer_trainer.per_image_psnr(jnp.asarray(recon), x)))
    metrics = evaluator(recon, labels, bootstrap=args.bootstrap)
    logits, _ = fashion.predict(recon, evaluator.apply_fn)
    same = float(np.mean(np.argmax(logits, -1) == original_pred))
    print(f"| {name} | {psnr:.2f} | {metrics['agreement']:.2%} | {same:.2%} | "
          f"{metrics['fd']:.2f} ± {metrics['fd_se']:.2f} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
