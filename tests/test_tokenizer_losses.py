"""The tokenizer's perceptual and adversarial terms: LPIPS and the PatchGAN against the reference's outputs
(tests/fixtures/tokenizer_losses), the GAN losses by hand, and the trainer with them on: the discriminator's start,
the adaptive weight, frozen parts, exact resume, fine-tuning from the tiny LlamaGen VQ fixture, weight-file errors."""

import ast
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fixture_rules
from npp_jax import config as config_lib
from npp_jax import convert
from npp_jax.model_files import param_mapping
from npp_jax.model_files import store
from npp_jax.model_files import torch_io
from npp_jax.models import classifier as classifier_lib
from npp_jax.trainers import tokenizer_trainer as tt
from npp_jax.trainers import vq_losses
from test_train_tokenizer import CONFIG, cli, tiny_fashion, tiny_overrides  # noqa: F401 (tiny_fashion: a fixture)


@pytest.fixture(scope="module")
def expected(fixtures_dir):
  with np.load(fixtures_dir / "tokenizer_losses" / "expected.npz") as npz:
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  """The fixture rule's random VGG16 (a torchvision-style file, with a classifier entry to read past) and heads."""
  directory = tmp_path_factory.mktemp("lpips")
  vgg, heads = fixture_rules.lpips_state_dicts()
  vgg["classifier.6.bias"] = np.zeros(1000, np.float32)
  torch_io.save_state_dict(vgg, directory / "vgg16.pth", container=None)
  torch_io.save_state_dict(heads, directory / "vgg.pth", container=None)
  return directory / "vgg16.pth", directory / "vgg.pth"


def test_lpips_matches_the_reference(lpips_files, expected):
  model = param_mapping.lpips_from_torch(*lpips_files)
  x, y = jnp.asarray(expected["lpips_x"]), jnp.asarray(expected["lpips_y"])
  np.testing.assert_allclose(model(x, y), expected["lpips_distance"], rtol=2e-5)
  np.testing.assert_allclose(model(y, y), expected["lpips_same"], atol=1e-12)
  grad = jax.grad(lambda x: jnp.sum(model(x, y)))(x)
  scale = np.abs(expected["lpips_grad_x"]).max()
  np.testing.assert_allclose(grad, expected["lpips_grad_x"], atol=1e-4 * scale)


def test_lpips_weight_file_errors(lpips_files, tmp_path):
  vgg_path, heads_path = lpips_files
  with pytest.raises(FileNotFoundError, match="does not exist"):
    param_mapping.lpips_from_torch(vgg_path, tmp_path / "nowhere.pth")
  _, heads = fixture_rules.lpips_state_dicts()
  heads["lin0.model.1.weight"] = heads["lin0.model.1.weight"][:, :32]
  torch_io.save_state_dict(heads, tmp_path / "bad.pth", container=None)
  with pytest.raises(ValueError, match=r"mis-shaped keys: lin0\.model\.1\.weight \(checkpoint \(1, 32, 1, 1\)"):
    param_mapping.lpips_from_torch(vgg_path, tmp_path / "bad.pth")
  with pytest.raises(ValueError, match="missing keys: lin0.model.1.weight"):  # the VGG file given twice
    param_mapping.lpips_from_torch(vgg_path, vgg_path)
  with pytest.raises(ValueError, match="LPIPS needs torchvision's vgg16 state dict"):
    param_mapping.lpips_from_torch("", heads_path)


def test_patchgan_matches_the_reference(expected):
  disc = param_mapping.patchgan_from_state_dict(fixture_rules.patchgan_state_dict())  # buffers read past
  real, fake = jnp.asarray(expected["disc_real"]), jnp.asarray(expected["disc_fake"])
  np.testing.assert_allclose(disc(real), expected["disc_logits_real"], atol=2e-5)
  np.testing.assert_allclose(disc(fake), expected["disc_logits_fake"], atol=2e-5)
  grad = jax.grad(lambda x: jnp.sum(disc(x)))(real)
  np.testing.assert_allclose(grad, expected["disc_grad_real"], atol=1e-5 * np.abs(expected["disc_grad_real"]).max())
  # The reference's loss functions on its own logits.
  lr, lf = expected["disc_logits_real"], expected["disc_logits_fake"]
  np.testing.assert_allclose(vq_losses.hinge_d_loss(lr, lf), expected["hinge_d_loss"], rtol=1e-6)
  np.testing.assert_allclose(vq_losses.vanilla_d_loss(lr, lf), expected["vanilla_d_loss"], rtol=1e-6)
  np.testing.assert_allclose(vq_losses.hinge_gen_loss(lf), expected["hinge_gen_loss"], rtol=1e-6)


def test_gan_losses_by_hand():
  real = np.array([[2.0, 0.5], [-1.0, 1.0]], np.float32)
  fake = np.array([[-2.0, 0.0], [0.5, -0.5]], np.float32)
  # hinge: relu(1 - real) = [0, .5, 2, 0] -> mean .625; relu(1 + fake) = [0, 1, 1.5, .5] -> mean .75
  assert float(vq_losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.625 + 0.75))
  assert float(vq_losses.hinge_gen_loss(fake)) == pytest.approx(0.5)  # -mean(fake) = -(-2 + 0 + .5 - .5) / 4
  softplus = lambda v: np.log1p(np.exp(v))
  assert float(vq_losses.vanilla_d_loss(real, fake)) == pytest.approx(
      0.5 * (softplus(-real).mean() + softplus(fake).mean()), rel=1e-6)
  assert float(vq_losses.non_saturating_gen_loss(fake)) == pytest.approx(
      -np.log(1 / (1 + np.exp(-fake))).mean(), rel=1e-6)
  active = [bool(vq_losses.discriminator_active(jnp.int32(s), 3)) for s in range(4)]
  assert active == [False, False, True, True]  # the reference's global_step = step + 1 >= disc_start
  assert float(vq_losses.adaptive_weight(jnp.full((4,), 3.0), jnp.full((4,), 4.0))) == pytest.approx(6 / (8 + 1e-4))


# ----------------------------------------------------------------------------------------------------------------------
# The trainer with the new terms on, at the tiny 8x8 size of test_train_tokenizer.


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> pathlib.Path:
  """A random 8x8 classifier directory: the perceptual network of the tiny runs (the shipped one sees 32x32)."""
  directory = tmp_path_factory.mktemp("classifier")
  arch = {"space_to_depth": 2, "stages": [[8], [8]], "feature_dim": 8, "num_classes": 10, "image_size": 8}
  model = classifier_lib.build(arch, seed=3)
  store.save_classifier(directory, model, arch, {}, (np.zeros(8), np.eye(8), 1))
  return directory


def gan_overrides(classifier_dir: pathlib.Path) -> list[str]:
  return [f"--config.perceptual.classifier={classifier_dir}", "--config.perceptual.weight=1.0",
          "--config.disc.weight=0.5", "--config.disc.start=3", "--config.disc.adaptive_weight=True",
          "--config.disc.channels=8", "--config.disc.layers=1"]


def tiny_config(data_dir, classifier_dir, *extra: str):
  """vq_fashion.py with the --config flags of the tiny runs applied (values read as Python literals)."""
  config = config_lib.load_file(CONFIG)
  for flag in tiny_overrides(data_dir) + gan_overrides(classifier_dir) + list(extra):
    path, raw = flag[len("--config."):].split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # a path
    *parents, leaf = path.split(".")
    section = functools.reduce(lambda c, name: c[name], parents, config)
    section[leaf] = float(value) if isinstance(section[leaf], float) else value
  return config


def images_at(step: int) -> np.ndarray:
  return np.random.default_rng(step).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)


def same_tree(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_discriminator_start_adaptive_weight_and_frozen_parts(tiny_fashion, tiny_classifier):  # noqa: F811
  """One trainer (one compilation) with the encoder and codebook frozen, the discriminator from global step 3."""
  config = tiny_config(tiny_fashion, tiny_classifier, "--config.train.freeze=('encoder','codebook')",
                       "--config.train.restart_every=0")
  trainer = tt.Trainer(config)
  state = jax.jit(trainer.init_state)()
  before = copy(state)
  for step in range(2):  # steps 0 and 1: global steps 1 and 2 < disc.start = 3
    state, metrics = trainer.train_step(state, images_at(step), trainer.perceptual_state)
    values = metrics.compute()
    assert float(values["disc_active"]) == 0 and float(values["gen_loss"]) == 0 and float(values["disc_loss"]) == 0
  assert same_tree(state["disc_params"], before["disc_params"])
  assert same_tree(state["disc_opt_state"], before["disc_opt_state"])
  # Step 2: the discriminator's first step; the adaptive weight against an independent computation by full
  # gradients of the two terms through the whole tokenizer, read at the last conv's kernel.
  params, disc_params = copy(state["params"]), copy(state["disc_params"])
  images = images_at(2)
  state, metrics = trainer.train_step(state, images, trainer.perceptual_state)
  values = metrics.compute()
  assert float(values["disc_active"]) == 1 and float(values["disc_loss"]) > 0
  assert not same_tree(state["disc_params"], disc_params)
  x = images.astype(np.float32) / 127.5 - 1.0
  distance = nnx.merge(trainer.perceptual_graphdef, trainer.perceptual_state)
  disc = nnx.merge(trainer.disc_graphdef, disc_params)
  recon = lambda p: trainer.model(p)(jnp.asarray(x))[0]
  nll = lambda p: jnp.mean(jnp.square(recon(p) - x)) + jnp.mean(distance(recon(p), jnp.asarray(x)))
  gen = lambda p: -jnp.mean(disc(recon(p)))
  last = lambda grads: grads["decoder"]["conv_out"]["kernel"]
  g_nll, g_gen = last(jax.jit(jax.grad(nll))(params)), last(jax.jit(jax.grad(gen))(params))
  weight = np.linalg.norm(g_nll) / (np.linalg.norm(g_gen) + 1e-4)
  assert float(values["adaptive_weight"]) == pytest.approx(weight, rel=1e-4)
  assert float(values["gen_loss"]) == pytest.approx(float(jax.jit(gen)(params)), rel=1e-5)
  perceptual = jax.jit(lambda p: jnp.mean(distance(recon(p), jnp.asarray(x))))
  assert float(values["perceptual"]) == pytest.approx(float(perceptual(params)), rel=1e-5)
  # Frozen parts: weight decay is on (optim.weight_decay 0.05), yet after 3 steps they have not moved at all.
  for name in ("encoder", "quant_conv", "quantize"):
    assert same_tree(state["params"][name], before["params"][name]), name
  for name in ("decoder", "post_quant_conv"):
    assert not same_tree(state["params"][name], before["params"][name]), name


def test_freeze_settings_that_cannot_work(tiny_fashion, tiny_classifier):  # noqa: F811
  config = tiny_config(tiny_fashion, tiny_classifier, "--config.train.freeze=('codebook',)")  # restarts on
  with pytest.raises(ValueError, match="train.restart_every=0"):
    tt.Trainer(config)
  config.train.freeze = ("encoder", "codebook", "decoder")
  with pytest.raises(ValueError, match="nothing would train"):
    tt.Trainer(config)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_gan_run_logs_every_term_and_resumes_exactly(tiny_fashion, tiny_classifier, tmp_path):  # noqa: F811
  flags = tiny_overrides(tiny_fashion) + gan_overrides(tiny_classifier) + [
      "--config.train.steps=6", "--config.train.eval_every=3", "--config.train.checkpoint_every=3"]
  workdir = tmp_path / "run"
  assert cli(workdir, *flags) == 0
  logged = [m for m in read_metrics(workdir) if "loss" in m]
  for term in ("mse", "perceptual", "codebook_loss", "commit_loss", "gen_loss", "disc_loss", "logits_real",
               "logits_fake", "adaptive_weight", "disc_active"):
    assert all(term in m for m in logged), term
  assert [m["disc_active"] for m in logged] == pytest.approx([1 / 3, 1])  # from global step 3 on (disc.start)
  assert sorted(p.name for p in (workdir / "reconstructions").iterdir()) == ["0000003.png", "0000006.png"]
  # An interrupted copy resumes from step 3 (tokenizer, discriminator, both optimizers) to the same tokenizer.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  shutil.rmtree(resumed / "tokenizer")
  (resumed / "eval.json").unlink()
  assert cli(resumed, *flags) == 0
  checksum = lambda w: json.loads((w / "eval.json").read_text())["checksum"]
  assert checksum(resumed) == checksum(workdir)


def test_fine_tune_from_the_tiny_llamagen_vq(fixtures_dir, tiny_fashion, tmp_path):  # noqa: F811
  """The 32x32 LlamaGen VQ fixture (ch 32, 64 codes) as train.init_from, its encoder frozen; 2 steps (L2 and codebook
  terms only: the others are tested above at the tiny size)."""
  pt = fixtures_dir / "llamagen_tiny" / "vq.pt"
  arch = ["--config.vq.ch=32", "--config.vq.encoder_ch_mult=(1,2)", "--config.vq.decoder_ch_mult=(1,2)",
          "--config.vq.z_channels=32", "--config.vq.codebook_size=64", "--config.vq.num_res_blocks=2",
          "--config.vq.image_size=32", "--config.data.image_size=32"]
  flags = [f"--config.data.dir={tiny_fashion}", "--config.data.val_images=16", "--config.train.batch_size=8",
           "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2",
           "--config.train.checkpoint_every=2", "--config.train.restart_every=0", "--config.train.eval_batch_size=16",
           f"--config.train.init_from={pt}", "--config.train.freeze=('encoder',)", *arch]
  assert cli(tmp_path / "run", *flags) == 0
  vq_cfg, _ = store.read_saved_vq(tmp_path / "run" / "tokenizer")
  tuned = nnx.to_pure_dict(nnx.state(store.load_vq(vq_cfg), nnx.Param))
  original = nnx.to_pure_dict(nnx.state(param_mapping.vq_from_torch(pt, vq_cfg), nnx.Param))
  assert same_tree(tuned["encoder"], original["encoder"]) and same_tree(tuned["quant_conv"], original["quant_conv"])
  assert not same_tree(tuned["decoder"], original["decoder"])
  # `convert export` writes it back to a .pt with the reference's state-dict names, which converts back exactly.
  out = tmp_path / "tuned.pt"
  assert convert.main(["convert", "export", "--checkpoint", str(tmp_path / "run" / "tokenizer"), "--out",
                       str(out)]) == 0
  assert set(torch_io.load_state_dict(out)) == set(torch_io.load_state_dict(pt))
  assert same_tree(nnx.to_pure_dict(nnx.state(param_mapping.vq_from_torch(out, vq_cfg), nnx.Param)), tuned)


def test_weight_file_errors_are_one_sentence(tiny_fashion, tmp_path, capsys):  # noqa: F811
  base = tiny_overrides(tiny_fashion) + ["--config.perceptual.weight=1.0", "--config.perceptual.network=lpips_vgg"]
  assert cli(tmp_path / "a", *base) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: ") and "perceptual.vgg_weights" in err
  assert cli(tmp_path / "b", *base, f"--config.perceptual.vgg_weights={tmp_path / 'vgg16.pth'}",
             f"--config.perceptual.lpips_weights={tmp_path / 'vgg.pth'}") == 1
  captured = capsys.readouterr().err
  assert "Traceback" not in captured and "vgg16.pth does not exist" in captured.strip().splitlines()[-1]
  assert cli(tmp_path / "c", *tiny_overrides(tiny_fashion), "--config.perceptual.weight=1.0",
             f"--config.perceptual.classifier={tmp_path}") == 1
  captured = capsys.readouterr().err
  assert "Traceback" not in captured and "holds no classifier" in captured.strip().splitlines()[-1]
