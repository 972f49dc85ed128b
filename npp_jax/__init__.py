"""npp-jax: Next Patch Prediction (Pang et al. 2024) over LlamaGen's class-conditional GPTs, in JAX/Flax.

Entry points (`python -m npp_jax.X --help`; one convention, see cli.py):
  main              train or resume a GPT (`--dry_run`: compile for a device or TPU slice and report memory,
                    collectives and a predicted step time)
  prepare           encode a dataset into VQ code shards for training
  sample            sample images from a model directory into PNGs, a grid and samples.npz
  evaluate          FID, sFID, IS and precision/recall of samples.npz against a reference batch
  convert           PyTorch checkpoints <-> native directories
  train_tokenizer   train the VQ tokenizer (the shipped Fashion-MNIST one)
  train_classifier  train the classifier of the Fashion-MNIST online metric
  demo              a local sampling page (Gradio, the [demo] extra) and a JSON API over a model directory
  study             NPP schedules against next-token prediction at matched images and FLOPs, with a report

Core: npp (the method), config (the default config, config files, config differences), config_schema (what each
config field allows, checked when a command loads it), sharding (meshes, pad_shard_unpad), distributed, cli (the
entry points' flags and one-sentence errors), errors (the user errors), fileio, images, huge_pages (a program of
this package restarts itself once with glibc's huge pages under large allocations: XLA:CPU's step temporaries).

Library, by role (no library module imports an entry point or cli):
  trainers/ (gpt_trainer, tokenizer_trainer, vq_losses, classifier_trainer, workdir, optim, dry_run, hlo_census,
    roofline, monitor, heldout, metrics, chips, host_memory)
  checkpoints/ (checkpoint, integrity, workdir_lock)                    a trainer's workdir on disk
  model_files/ (store, param_mapping, torch_io)                         model directories and PyTorch weight rules
  sampling/ (decoding, generation)                                      KV-cache sampling; model in, images out
  serving/ (row_decoding, engine, http_api)                             many requests sharing one compiled batch
  models/ (gpt, rope, dropout, vq, inception, classifier, lpips, patchgan)  the networks
  kernels/ (library, packed_matmul, decode_attention)                   CPU kernels for the sampler's decode steps
  data/ (sources, augment, prepare, records, pipeline, synthetic)       codes from images, batches from codes
  eval/ (adm, fashion, study_report)                                    sample-quality metrics, the study's report
  assets (paths of the shipped tokenizer and classifier)
"""

from npp_jax import huge_pages as _huge_pages

_huge_pages.restart_with_huge_pages()  # only in `python -m npp_jax.X`, before anything heavy is imported
