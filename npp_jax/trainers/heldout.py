"""The held-out loss: the model's next-token loss on codes of images it never trains on.

Whatever the stage, this is the 1x1 (next-token) loss, without dropout and with the true class labels: the one
quantity every arm of a study shares, so its curve shows whether a run has converged or begun to overfit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from npp_jax import errors
from npp_jax import npp
from npp_jax import sharding


class HeldoutLoss:
  """`loss(params)`: the mean next-token loss over the held-out codes, in batches of `batch_size` sequences.

  Every batch has the same size (the tail that does not fill one is left out) so one compilation serves the run;
  each process feeds its own rows of each batch, as the training input does.
  """

  def __init__(self, codes: dict[str, np.ndarray], graphdef: Any, mesh: jax.sharding.Mesh, batch_size: int,
               param_shardings: Any):
    num_batches = len(codes["tokens"]) // batch_size
    if num_batches == 0:
      raise errors.InvalidInput(f"the {len(codes['tokens'])} held-out images do not fill one batch of {batch_size}; "
                                "raise data.heldout_images or give more held-out codes")
    self.num_images = num_batches * batch_size
    local = batch_size // jax.process_count()
    offset = jax.process_index() * local
    self._batches = [{k: v[b * batch_size + offset:b * batch_size + offset + local] for k, v in codes.items()}
                     for b in range(num_batches)]
    self._mesh = mesh

    def batch_loss(params, batch):
      model = nnx.merge(graphdef, params)
      logits = model(batch["tokens"], batch["labels"], patch_side=1, deterministic=True)
      return npp.patch_loss(logits, batch["tokens"], 1)

    batch_sharding = sharding.batch_sharding(mesh)
    self._batch_loss = jax.jit(batch_loss, in_shardings=(param_shardings, {"tokens": batch_sharding,
                                                                           "labels": batch_sharding}))

  def __call__(self, params: Any) -> float:
    losses = [self._batch_loss(params, sharding.global_batch(batch, self._mesh)) for batch in self._batches]
    return float(jnp.mean(jnp.stack(losses)))
