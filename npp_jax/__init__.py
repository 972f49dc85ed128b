"""npp-jax: Next Patch Prediction (Pang et al. 2024) over LlamaGen's class-conditional GPTs, in JAX/Flax.

Entry points (`python -m npp_jax.X --help`; one convention, see cli.py):
  main              train or resume a GPT (`--dry_run`: compile for a device or TPU slice and report memory)
  prepare           encode a dataset into VQ code shards for training
  sample            sample images from a model directory into PNGs, a grid and samples.npz
  evaluate          FID, sFID, IS and precision/recall of samples.npz against a reference batch
  convert           PyTorch checkpoints <-> native directories
  train_tokenizer   train the VQ tokenizer (the shipped Fashion-MNIST one)
  train_classifier  train the classifier of the Fashion-MNIST online metric
  demo              a local sampling page (Gradio, the [demo] extra) over a model directory
  study             NPP schedules against next-token prediction at matched images and FLOPs, with a report

Library:
  npp, train, optim, sharding, sampling, monitor, metrics, dry_run, distributed   the method and the trainer
  models/ (gpt, rope, vq, inception, classifier)                                 the networks
  data/ (sources, augment, prepare, records, pipeline, synthetic)                codes from images, batches from codes
  eval/ (adm, fashion)                                                           sample-quality metrics
  study_report                                                                   the study's report.md and plots
  checkpoint (every native directory), integrity (per-step checksums), workdir_lock (one trainer per workdir),
  convert (PyTorch rules), torch_io (.pt/.safetensors files), fileio,
  images (PNG, grids, samples.npz), config (the default config), chips (accelerator table), cli, assets (paths)
"""
