"""Sample-quality metrics (library only; the networks they run live in npp_jax/models/).

  adm      FID, sFID, Inception Score and precision/recall with the ADM evaluator's formulas, over pytorch-fid's
           Inception (models/inception.py); the whole `python -m npp_jax.evaluate` pipeline.
  fashion  the Fashion-MNIST classifier metric of the default run: label agreement and the Frechet distance in the
           classifier's feature space (models/classifier.py).
"""
