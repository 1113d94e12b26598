"""The pre-training recipe: ``fastpt pretrain --config X.yaml [--resume] [--set key=value ...]``.

Python: ``fastpt.train.pretrain(config, resume=False, overrides=()) -> summary dict`` with
``config`` a dict or a YAML path. Several GPUs or machines: ``torchrun --nproc_per_node N -m
fastpt pretrain --config X.yaml`` (DDP; ``train.fsdp: true`` shards with FSDP2).

Recipe YAML (every key optional except ``model`` (or ``init_from``), ``data.path`` or
``data.images``, and one of ``train.max_steps`` / ``max_tokens`` / ``max_time_s``; unknown keys
are rejected naming the key and the valid ones, and so is a key given twice; relative paths (model
YAML, data.path, data.images, init_from, output.dir) are read from the current directory, not the
recipe file's; defaults shown)::

    model: bert-mini          # zoo name (fastpt.list_configs()), model YAML path, or an inline
                              # {backbone: {builder: ...}, objective: {name: ...}} mapping; its
                              # defaults: block (seq_len, batch_size, lr, ...) sits under this recipe
    init_from: null           # continued pre-training: a fastpt model / checkpoint directory, a
                              # fastpt run directory (its newest good checkpoint), a Hugging Face
                              # model directory (config.json + safetensors, fastpt.from_hf) or a
                              # `fastpt convert --from-hf` output; with a model: the recipe's objective
                              # on the loaded backbone (which must be the recipe's backbone), heads it
                              # lacks start random (logged); without one, all of the loaded model.
                              # --resume continues the checkpoint's model: a changed model: is refused
    data:
      path: null              # shard directory written by `fastpt preprocess` (text), or
      images: null            # fashion-mnist | image folder | `fastpt preprocess --images` output
      seq_len: 128            # tokens per row, cut at run time from the shards
      mode: pack              # pack: documents back to back (cu_seqlens); doc: one padded document per row
      add_special: auto       # separators around each document: auto | cls_sep | eos | none (auto: none
                              # for nsp / sop, which write their own around pairs cut from one document)
      shuffle: true           # a new order of the windows / images every epoch (from seed)
      verify: true            # check the shard checksums on open
      image_size: null        # resize images to this side (null: as stored)
      prefetch: null          # batches made ahead on a background thread, pinned on CUDA (null: 2 on a
                              # GPU, 0 on a CPU, whose cores run the step); resumes exactly either way
    train:
      batch_size: 32          # rows per device per micro-step
      grad_accum: 1           # micro-steps per optimizer step (gradients all-reduced on the last only; token-mean
                              # losses weigh each micro-batch by its targets: the loss of one big batch)
      max_steps: null         # stop after this many optimizer steps ...
      max_tokens: null        # ... or this many tokens (patches for images), over all ranks ...
      max_time_s: null        # ... or this many seconds of training (over resumes), whichever first
      lr: 1.0e-4              # peak learning rate (AdamW)
      weight_decay: 0.01      # on weight matrices only
      betas: [0.9, 0.999]     # AdamW's (RoBERTa: [0.9, 0.98]); a --resume applies the recipe's, and
      eps: 1.0e-8             # weight_decay's, from the resumed step on (noted in the log when changed)
      warmup_steps: 0         # linear warmup
      schedule: cosine        # cosine | linear | constant after the warmup; it decays over the run to the
                              # first of max_steps and max_tokens (converted to steps) it reaches
      min_lr_ratio: 0.1       # final lr / peak lr
      clip_grad: 1.0          # max gradient norm (null: no clipping). A step whose gradients are not finite
                              # stops a bf16 / fp32 run at the next log row or save (never saved; fp16 skips it)
      precision: auto         # auto (bf16 where the device multiplies it natively: a CUDA GPU with bf16
                              # tensor cores, a CPU with AVX512_BF16 or AMX whose bf16 GEMMs beat fp32's;
                              # else fp32) | fp32 | bf16 | fp16
                              # (fp16: loss scaling; a step it skips for inf gradients still counts and
                              # still moves EMA teachers / DINO's center, as their reference loops do;
                              # --resume under auto keeps the precision the checkpoint trained in)
      compile: false          # torch.compile the backbone (one graph in training, dropout included;
                              # the objective's head stays eager): true, or a torch.compile mode
                              # (max-autotune: Inductor tunes its GEMMs and kernels, slower to
                              # start; reduce-overhead: CUDA graphs). For GPUs: on 2 CPU cores fastpt's
                              # eager step measured 1.02-1.16x faster (e2e-cpu-compile.md). Dropout
                              # masks then come from Inductor's generator (seeded from torch's, which
                              # the checkpoint saves); the bit-identical --resume test runs eager.
      activation_checkpointing: false  # recompute each transformer layer in the backward (every stack: encoder,
                              # decoder, MAE decoder, both CLIP towers; not the heads, not no-grad teachers):
                              # stored activations ~1/12 at 6 layers, same gradients (dropout masks replay)
      seed: 0                 # model init, data order, masks (per step), dropout
      device: auto            # auto | cpu | cuda
      fsdp: false             # FSDP2 fully_shard per layer instead of DDP
      find_unused_parameters: false   # DDP, for objectives that leave parameters unused
      peak_tflops: null       # the device's peak for MFU when fastpt.train.mfu does not know it
    output:
      dir: null               # default runs/<model name>
      save_every: 1000        # checkpoint every N steps (0: only at the end)
      keep_last: 3            # checkpoints kept (null: all)
      log_every: 10           # steps per log line / CSV row
      tensorboard: true       # needs the tensorboard package
      plot: true              # loss.png at the end (needs matplotlib)
      progress: true          # progress bar on a terminal

Output directory: ``config.yaml`` (the resolved recipe), ``checkpoints/step-NNNNNNNN/``
(``fastpt.train.checkpoint``), ``metrics.csv``, ``tensorboard/``, ``loss.png``,
``summary.json``. ``--resume`` continues from the newest checkpoint that verifies, exactly:
same data position, masks, RNG states and schedule.
"""
from .checkpoint import CorruptCheckpointError, latest_checkpoint
from .config import DEFAULTS, ConfigError, load_recipe
from .recipe import Interrupted, PretrainRecipe, pretrain, pretrain_main

__all__ = ["pretrain", "pretrain_main", "PretrainRecipe", "Interrupted", "load_recipe", "DEFAULTS", "ConfigError",
           "CorruptCheckpointError", "latest_checkpoint"]
