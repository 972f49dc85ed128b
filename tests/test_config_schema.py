"""The config schema: every shipped config passes; every field's refused values (taken from its own rule, so a new
field is covered by its line in the schema) end the command with one sentence naming the field, exit 1 and nothing
written; joint rules and unknown fields too; a checkpoint of other sizes is refused in our words."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import pytest
from flax import nnx

from npp_jax import config as config_lib
from npp_jax import config_schema as schema_lib
from npp_jax import errors
from npp_jax import main
from npp_jax import prepare
from npp_jax import train_classifier
from npp_jax import train_tokenizer
from npp_jax.model_files import store
from npp_jax.models import gpt

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Each shipped config with the schema of the command that reads it.
SHIPPED = [("tiny", schema_lib.TRAINER), ("fashion", schema_lib.TRAINER), ("gpt_b", schema_lib.TRAINER),
           ("gpt_l", schema_lib.TRAINER), ("gpt_xl", schema_lib.TRAINER), ("gpt_xxl", schema_lib.TRAINER),
           ("vq_fashion", schema_lib.TOKENIZER), ("vq_fashion_finetune", schema_lib.TOKENIZER),
           ("vq_16_finetune", schema_lib.TOKENIZER), ("vq_16", schema_lib.MODEL_ONLY),
           ("fashion_classifier", schema_lib.CLASSIFIER), ("prepare_imagenet", schema_lib.PREPARE),
           ("study_fashion", schema_lib.STUDY), ("study_fashion_epochs", schema_lib.STUDY)]

# Entry point, the name of its body (replaced so that a value the check lets through fails the test at once instead
# of training), its config file, schema and output flag.
COMMANDS = {
    "trainer": (main, "run", "tiny", schema_lib.TRAINER, "--workdir"),
    "tokenizer": (train_tokenizer, "run_from_flags", "vq_fashion", schema_lib.TOKENIZER, "--workdir"),
    "classifier": (train_classifier, "run_from_flags", "fashion_classifier", schema_lib.CLASSIFIER, "--out"),
    "prepare": (prepare, "run", "prepare_imagenet", schema_lib.PREPARE, "--out"),
}


def one_sentence(stderr: str) -> str:
  """The error: one `error:` line, the last (log lines may come before it), and no traceback."""
  lines = stderr.strip().splitlines()
  found = [line for line in lines if line.startswith("error: ")]
  assert "Traceback" not in stderr and len(found) == 1 and lines[-1] == found[0], stderr[-2000:]
  return found[0]


def command_line_cases(command: str) -> list[tuple[str, str, object]]:
  """(command, path, refused value) for every field of the command's config and every value its rule refuses that a
  `--config.path=value` can carry (a string field reads any text as a string)."""
  _, _, name, schema, _ = COMMANDS[command]
  config = config_lib.load_file(str(CONFIGS / f"{name}.py"))
  cases = []
  for path, rule in schema.fields.items():
    if not schema_lib.has_field(config, path):
      continue
    default = schema_lib.value_at(config, path)
    cases += [(command, path, v) for v in rule.refused if not (isinstance(default, str) and not isinstance(v, str))]
  return cases


def as_flag(value) -> str:
  return repr(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("name,schema", SHIPPED, ids=[n for n, _ in SHIPPED])
def test_every_shipped_config_passes_and_every_field_has_a_rule(name, schema):
  config = config_lib.load_file(str(CONFIGS / f"{name}.py"))
  schema_lib.check(config, schema)  # also refuses a field the schema does not know
  for path, rule in schema.fields.items():
    if schema_lib.has_field(config, path):
      assert rule.accepts(schema_lib.value_at(config, path)), path


def test_every_config_file_is_checked_above():
  assert {name for name, _ in SHIPPED} == {path.stem for path in CONFIGS.glob("*.py")}


def test_the_trainer_schema_refuses_a_value_of_every_kind_for_every_field():
  """Out of range, wrong type and wrong choice: each rule lists them, and its own `accepts` agrees."""
  for path, rule in schema_lib.TRAINER.fields.items():
    assert rule.refused, path
    assert not any(rule.accepts(v) for v in rule.refused), path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_refused_value_on_the_command_line_is_one_sentence_and_writes_nothing(command, tmp_path, capsys,
                                                                                   monkeypatch):
  module, body, name, _, out_flag = COMMANDS[command]
  monkeypatch.setattr(module, body, lambda fv: pytest.fail(f"the command ran with {fv.config}"))
  out = tmp_path / "out"
  cases = command_line_cases(command)
  assert len(cases) >= 10
  for _, path, value in cases:
    flag = f"--config.{path}={as_flag(value)}"
    status = module.main(["prog", "--config", str(CONFIGS / f"{name}.py"), out_flag, str(out), flag])
    line = one_sentence(capsys.readouterr().err)
    assert status == 1 and f"{path}=" in line and "must be" in line, (flag, line)
    assert list(tmp_path.iterdir()) == [], flag  # nothing written: no workdir, no lock, no config.json


def test_a_wrong_type_in_a_config_file_names_the_field():
  """A file that builds its sections from scratch is not held to the defaults' types by ml_collections."""
  for path, rule in schema_lib.TRAINER.fields.items():
    for value in rule.refused:
      config = config_lib.load_file(str(CONFIGS / "tiny.py")).to_dict()
      section, field = path.rsplit(".", 1) if "." in path else ("", path)
      node = config
      for part in filter(None, section.split(".")):
        node = node[part]
      node[field] = value
      with pytest.raises(errors.InvalidInput) as refused:
        schema_lib.check(ml_collections.ConfigDict(config), schema_lib.TRAINER)
      assert str(refused.value).startswith(f"{path}={value!r} is not allowed: it must be {rule.allowed}")


@pytest.mark.parametrize("overrides,fragment", [
    ({"npp.stages": ((3, 1.0),)}, "npp.stages=((3, 1.0),), model.block_size=64: patch side 3 does not divide"),
    ({"npp.stages": ((2, 0.7), (1, 0.5))}, "fractions must sum to 1"),
    ({"model.block_size": 60}, "model.block_size=60 is not a square number"),
    ({"model.n_head": 5}, "model.dim=64 is not divisible by model.n_head=5"),
    ({"train.grad_accum_steps": 3}, "train.global_batch_size=32 is not a multiple of train.grad_accum_steps=3"),
    ({"mesh.shape": (3, 1, 1)}, "does not split over the 3 devices of mesh.shape=(3, 1, 1)"),
    ({"optim.stage_lr_scales": (1.0,)}, "optim.stage_lr_scales=(1.0,) needs one entry per stage"),
    ({"vq.checkpoint": "x", "vq.codebook_size": 32}, "model.vocab_size=64 differs from vq.codebook_size=32"),
    ({"eval.heldout_every": 5}, "eval.heldout_every=5 needs held-out codes: set data.heldout_codes_dir, or"),
    ({"eval.heldout_every": 5, "data.heldout_split": "test"}, "eval.heldout_every=5 needs held-out codes"),
])
def test_joint_rules(overrides, fragment):
  config = config_lib.load_file(str(CONFIGS / "tiny.py"))
  for path, value in overrides.items():
    section, field = path.rsplit(".", 1)
    schema_lib.value_at(config, section)[field] = value
  with pytest.raises(errors.InvalidInput) as refused:
    schema_lib.check(config, schema_lib.TRAINER)
  assert fragment in str(refused.value)


def test_a_misspelt_field_in_a_config_file_is_refused(tmp_path, capsys):
  file = tmp_path / "typo.py"
  file.write_text(f"import runpy\ndef get_config():\n  c = runpy.run_path({str(CONFIGS / 'tiny.py')!r})['get_config']()"
                  "\n  c.train.log_evry = 5\n  return c\n")
  assert main.main(["prog", "--config", str(file), "--workdir", str(tmp_path / "w")]) == 1
  line = one_sentence(capsys.readouterr().err)
  assert "train.log_evry is not a field of the trainer config (did you mean train.log_every?)" in line
  assert not (tmp_path / "w").exists()


def test_a_misspelt_override_names_the_nearest_field(tmp_path, capsys):
  assert main.main(["prog", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(tmp_path / "w"),
                    "--config.train.log_evry=5"]) == 1
  assert one_sentence(capsys.readouterr().err) == ("error: --config.train.log_evry: train.log_evry is not a field of "
                                                   "the trainer config (did you mean train.log_every?)")
  assert not (tmp_path / "w").exists()


def test_a_missing_input_path_is_refused_before_the_workdir_is_touched(tmp_path, capsys):
  assert main.main(["prog", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(tmp_path / "w"),
                    f"--config.eval.reference={tmp_path / 'ref.npz'}"]) == 1
  assert one_sentence(capsys.readouterr().err) == f"error: eval.reference='{tmp_path / 'ref.npz'}' does not exist"
  assert list(tmp_path.iterdir()) == []


def test_keep_checkpoints_0_is_refused_before_training_as_a_process(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run([sys.executable, "-m", "npp_jax.main", "--config", str(CONFIGS / "tiny.py"), "--workdir",
                           str(tmp_path / "w"), "--config.train.keep_checkpoints=0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert one_sentence(result.stderr) == ("error: train.keep_checkpoints=0 is not allowed: it must be an integer >= 1 "
                                         "(0 would delete every checkpoint as it is saved)")
  assert list(tmp_path.iterdir()) == []


# -- a checkpoint of other sizes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  config = config_lib.load_file(str(CONFIGS / "tiny.py"))
  directory = tmp_path_factory.mktemp("model") / "tiny"
  store.save_gpt(gpt.GPT(config.model, rngs=nnx.Rngs(0)), config, directory)
  return directory


def test_restoring_other_sizes_names_the_parameter_both_shapes_and_the_field(tiny_model_dir):
  config = config_lib.load_file(str(CONFIGS / "tiny.py"))
  config.model.vocab_size = 32
  with pytest.raises(errors.InvalidInput) as refused:
    store.load_model(str(tiny_model_dir), config)
  found = re.fullmatch(rf"the checkpoint in {tiny_model_dir} does not fit the config: its parameter (\S+) has shape "
                       r"(\(.*?\)), the config's model needs (\(.*?\)); set model.vocab_size=64 as in its config.json, "
                       "or give a checkpoint of the config's sizes", str(refused.value))
  assert found, str(refused.value)

  def shape_of(model_config, name):
    abstract = nnx.eval_shape(lambda: gpt.GPT(model_config, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
    return {".".join(str(k.key) for k in path): leaf.shape for path, leaf in leaves}[name]

  saved_config = config_lib.load_file(str(CONFIGS / "tiny.py"))
  assert ast.literal_eval(found.group(2)) == shape_of(saved_config.model, found.group(1))
  assert ast.literal_eval(found.group(3)) == shape_of(config.model, found.group(1))
  assert found.group(2) != found.group(3)


def test_init_from_of_other_sizes_is_refused_before_the_workdir_is_touched(tiny_model_dir, tmp_path, capsys):
  assert main.main(["prog", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(tmp_path / "w"),
                    f"--config.init_from={tiny_model_dir}", "--config.model.dim=32"]) == 1
  line = one_sentence(capsys.readouterr().err)
  assert "has shape" in line and "set model.dim=64 as in its config.json" in line and "strict" not in line
  assert not (tmp_path / "w").exists()


def test_sample_with_a_config_of_other_sizes_is_one_sentence_as_a_process(tiny_model_dir, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run([sys.executable, "-m", "npp_jax.sample", "--checkpoint", str(tiny_model_dir), "--vq",
                           str(tiny_model_dir / "config.json"), "--config", str(CONFIGS / "tiny.py"),
                           "--config.model.n_layer=3", "--num_images", "2", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  line = one_sentence(result.stderr)  # and no stray traceback from Orbax's threads at exit
  assert "Event loop" not in result.stderr and "strict" not in line
  assert "has shape (2, " in line and "needs (3, " in line and "set model.n_layer=2 as in its config.json" in line
  assert not (tmp_path / "out").exists()
