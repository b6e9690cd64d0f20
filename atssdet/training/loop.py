"""The training loop: the MegEngine ATSS recipe, resumable, on one process or many (``torchrun``).

``result = train(cfg, train_ann=..., train_images=..., out_dir=...)`` runs the optimizer of
:mod:`~atssdet.training.schedule` (SGD, momentum ``cfg.momentum``, weight decay ``cfg.weight_decay``)
with ``lr = cfg.basic_lr * global batch``, a linear warm-up over ``cfg.warm_iters`` iterations and a
step decay ``x cfg.lr_decay_rate`` at the epochs ``cfg.lr_decay_stages`` (an epoch is
``cfg.nr_images_epoch`` images), exactly as MegEngine's ``tools/train.py``. Only parameters with
``requires_grad`` are optimised (``cfg.backbone_freeze_at``).

Checkpoints (:mod:`~atssdet.training.checkpoint`) are written every ``checkpoint_every`` iterations
and at the end; a resumed run computes the same losses as an uninterrupted one. The final weights
are also written as ``out_dir/model_final.safetensors`` (with the config) for ``predict``/``eval
--weights``. The log is ``out_dir/train_log.jsonl`` (:mod:`~atssdet.training.log`).

Under ``torchrun`` the model is wrapped in DistributedDataParallel, every rank reads its own shard of
each epoch, the loss normalisers are averaged across ranks (:func:`atssdet.criterion.atss_loss`) and
only rank 0 writes files. Every collective has a timeout (``dist_timeout``), so a dead or stuck rank
ends the job with :class:`~atssdet.distributed.DistributedError` instead of a hang.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from atssdet import distributed
from atssdet.config import ATSSConfig
from atssdet.data.loader import build_train_loader
from atssdet.modeling.atss import build_model
from atssdet.training.checkpoint import (
    FINAL_WEIGHTS_NAME,
    Checkpointer,
    Resume,
    TrainingState,
    open_resume,
    restore,
    save_final_weights,
    seed_everything,
)
from atssdet.training.data import check_training_data, training_dataset
from atssdet.training.device import DeviceOptions, compiled, cudnn_autotuning, device_options, prepare_model
from atssdet.training.log import LOG_NAME, TrainLog, start_record
from atssdet.training.loggers import LoggerOptions
from atssdet.training.ownership import claim_run_folder, releases_run_folders
from atssdet.training.result import TrainingError, TrainResult
from atssdet.training.schedule import build_optimizer, learning_rate, set_learning_rate, total_iterations
from atssdet.training.step import train_step
from atssdet.training.weights import init_weights


@releases_run_folders  # the lock on out_dir is held until train() returns or raises
def train(
    cfg: ATSSConfig,
    *,
    train_ann: str | os.PathLike[str],
    train_images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    val_ann: str | os.PathLike[str] | None = None,
    val_images: str | os.PathLike[str] | None = None,
    batch_size: int = 2,
    max_iters: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    amp: bool | str | None = None,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    compile: bool = False,
    cudnn_benchmark: bool = False,
    init_backbone: str | os.PathLike[str] | None = None,
    finetune: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 5000,
    keep_checkpoints: int | None = None,
    eval_every: int = 0,
    num_workers: int = 2,
    seed: int = 0,
    log_every: int | None = None,
    progress: bool = True,
    max_bad_images: int = 100,
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
    data_check: str = "full",
    allow_layout_change: bool = False,
    overwrite: bool = False,
    loggers: LoggerOptions | None = None,
) -> TrainResult:
    """Train an ATSS detector on a COCO-format split; see the module docstring for the recipe.

    Args:
        cfg: model and recipe. ``num_classes``/``class_names`` are taken from the training set.
        train_ann, train_images: COCO ``instances`` JSON and the folder its ``file_name`` is relative to.
        out_dir: checkpoints, ``train_log.jsonl``, validation results and the final weights go here.
        val_ann, val_images: optional validation split, evaluated (COCO mAP) every ``eval_every``
            iterations (0: only at the end) with :func:`atssdet.evaluation.evaluate`.
        batch_size: images per process; the global batch is ``batch_size * world_size`` and sets the lr.
        max_iters: stop after this many iterations (default: ``max_epoch`` epochs); the schedule
            (warm-up, decay epochs) does not change with it.
        resume: a checkpoint path, or ``"auto"``: the newest checkpoint in ``out_dir`` that loads (none:
            start from scratch). Continues exactly where that run stopped, which needs the checkpoint's
            processes x batch layout and its config but for logging, test-time and numerics fields.
        allow_layout_change: resume a checkpoint written under another processes x batch layout (e.g.
            8 GPUs -> 4): training continues at the same number of images seen (iteration
            ``saved_iteration * saved_global_batch // global_batch``) with the lr of the new global
            batch; the data order then differs from an uninterrupted run.
        overwrite: start a new run in an ``out_dir`` that holds another run's checkpoints or final
            weights (refused otherwise, unless ``resume``); see :mod:`~atssdet.training.ownership`.
        amp: mixed precision of the forward pass: ``"bf16"`` (CPU or GPU), ``"fp16"`` (CUDA only, with a
            GradScaler; ``True`` means this); losses in float32 either way. None: float32.
        device: default ``cuda`` if available (``cuda:LOCAL_RANK`` under torchrun), else ``cpu``.
        channels_last, compile, cudnn_benchmark: NHWC weights and activations, ``torch.compile`` of the
            forward pass, cuDNN autotuning per input shape (for fixed sizes); see
            :mod:`atssdet.training.device`. None changes the checkpoint format.
        init_backbone: ImageNet ResNet weights (torchvision ``.pth`` or MegEngine ``.pkl``).
        finetune: a detector checkpoint (zoo ``.pkl``, ``.safetensors``, ``.pt``) to start from; its
            classifier is replaced when the class count differs (always re-initialised).
        checkpoint_every: write ``iter_XXXXXXXX.pt`` (and ``last.pt``) every this many iterations.
        keep_checkpoints: keep only the newest this many ``iter_*.pt`` files (None: keep all).
        num_workers: DataLoader worker processes per rank.
        seed: model initialisation and the data order/augmentation stream.
        log_every: JSONL record every this many iterations (default ``cfg.log_interval``).
        max_bad_images: stop with :class:`TrainingError` once more unreadable images were skipped.
        dist_timeout: seconds before a collective that waits for a dead/stuck rank fails.
        data_check: ``"full"``: :func:`atssdet.data.check.check_dataset` on the training split, decoding
            every image, before anything else; ``"quick"``: the annotation file and that the image files
            exist; ``"off"``. Fatal problems stop training with the report.
        loggers: TensorBoard / MLflow sinks beside ``train_log.jsonl`` (:mod:`~atssdet.training.loggers`).

    Raises:
        TrainingError: non-finite loss (message names iteration and image ids; earlier checkpoints are
            untouched) or too many unreadable images.
        DistributedError: another rank died or hung.
    """
    _check_arguments(batch_size, checkpoint_every, init_backbone, finetune)
    info = distributed.init_distributed(device=device, timeout=dist_timeout)
    opts = device_options(cfg, device, amp=amp, channels_last=channels_last, compile=compile,
                          cudnn_benchmark=cudnn_benchmark)  # fmt: skip
    dev = opts.device
    world, global_batch, out = info.world_size, batch_size * info.world_size, Path(out_dir)
    owner = claim_run_folder(out, resume=resume, overwrite=overwrite)  # one run per folder; its temp files
    check_training_data(train_ann, train_images, mode=data_check, progress=progress)
    dataset, cfg = training_dataset(cfg, train_ann, train_images)
    resumed = None
    if resume is not None:
        resumed = open_resume(
            resume, out, cfg, batch_size=batch_size, allow_layout_change=allow_layout_change, run=owner
        )
    owner.begin(resumed, overwrite=overwrite)  # the run id: the resumed checkpoint's, or a new one
    seed = resumed.seed if resumed is not None and resumed.seed is not None else seed
    run = _training_state(cfg, resumed, seed=seed, opts=opts, global_batch=global_batch,
                          init_backbone=init_backbone, finetune=finetune)  # fmt: skip
    start = resumed.start_iteration if resumed is not None else 0
    net: nn.Module = run.model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    run.model.train()
    step_net = compiled(net, opts)

    end = max_iters if max_iters is not None else total_iterations(cfg, global_batch)
    loader = build_train_loader(
        dataset, batch_size=batch_size, seed=seed, num_workers=num_workers, rank=info.rank, world_size=world,
        start_batch=start, pin_memory=dev.type == "cuda", skip_unreadable=True,
    )  # fmt: skip
    result = TrainResult(
        start_iteration=start, iteration=start, losses=[], checkpoint=resumed.path if resumed else None,
        weights=None, skipped_images=run.skipped_images, config=cfg,
    )  # fmt: skip
    checkpointer = Checkpointer(out, cfg, batch_size=batch_size, seed=seed, keep=keep_checkpoints, run=owner)
    log = TrainLog(
        out / LOG_NAME if info.is_main else None, start=start, end=end, log_every=log_every or cfg.log_interval,
        progress=progress, device=dev, loggers=loggers,
    )  # fmt: skip
    log.write(start_record(
        cfg, iteration=start, max_iters=end, batch_size=batch_size, world_size=world, opts=opts,
        resume=resumed, num_images=len(dataset),
    ))  # fmt: skip
    batches = iter(loader)
    val = (val_ann, val_images) if val_ann is not None and val_images is not None else None
    with cudnn_autotuning(opts.cudnn_benchmark), log:
        for iteration in range(start, end):
            t0 = time.perf_counter()
            batch, bad = next(batches)
            data_time = time.perf_counter() - t0
            for reason in bad:  # every rank reports its own
                print(f"atssdet train: warning: skipping unreadable image: {reason}", file=sys.stderr)
            lr = set_learning_rate(run.optimizer, learning_rate(cfg, iteration, global_batch=global_batch))
            step = train_step(
                step_net,
                batch,
                bad,
                cfg,
                run,
                iteration=iteration,
                opts=opts,
                last_checkpoint=result.checkpoint,
            )
            run.skipped_images.extend(bad)
            run.bad_images_total += step.num_bad
            done = result.iteration = iteration + 1
            result.losses.append({"iteration": done, **step.losses, "lr": lr})
            log.step(result.losses[-1], data_time=data_time, skipped_images=run.bad_images_total)
            _check_bad_images(run.bad_images_total, max_bad_images, iteration=done)
            if done % checkpoint_every == 0 or done == end:
                result.checkpoint = checkpointer.save(done, run)
                log.checkpoint(done, result.checkpoint)
            if val is not None and (eval_every and done % eval_every == 0 or done == end):
                stats = _validate(net, *val, out=out, iteration=done, batch_size=batch_size, device=dev,
                                  num_workers=num_workers)  # fmt: skip
                result.evals.append({"iteration": done, "stats": stats})
                log.evaluation(done, stats)
                run.model.train()

    if result.iteration == end:
        result.weights = out / FINAL_WEIGHTS_NAME
        if info.is_main:
            save_final_weights(run.model, result.weights, cfg)
            log.say(f"wrote {result.weights}")
    distributed.barrier()
    return result


def _training_state(
    cfg: ATSSConfig,
    resumed: Resume | None,
    *,
    seed: int,
    opts: DeviceOptions,
    global_batch: int,
    init_backbone: str | os.PathLike[str] | None,
    finetune: str | os.PathLike[str] | None,
) -> TrainingState:
    """Model (seeded initialisation, then the start weights or the checkpoint's), optimizer and scaler,
    restored from ``resumed`` when given; in this order, which the RNG streams of a resume rely on."""
    seed_everything(seed)
    atss = build_model(cfg)
    if resumed is None:
        init_weights(atss, backbone=init_backbone, finetune=finetune)
    else:
        atss.load_state_dict(resumed.state["model"], strict=True)
    model: nn.Module = prepare_model(atss.to(opts.device), opts)
    if cfg.backbone_norm == "SyncBN" and distributed.get_world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, lr=learning_rate(cfg, 0, global_batch=global_batch))
    run = TrainingState(model, optimizer, opts.grad_scaler())
    if resumed is not None:
        restore(resumed, run, seed=seed)
    return run


def _check_arguments(
    batch_size: int,
    checkpoint_every: int,
    init_backbone: str | os.PathLike[str] | None,
    finetune: str | os.PathLike[str] | None,
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if init_backbone is not None and finetune is not None:
        raise ValueError("give either init_backbone or finetune, not both")


def _check_bad_images(bad_total: int, limit: int, *, iteration: int) -> None:
    if bad_total > limit:
        raise TrainingError(
            f"{bad_total} unreadable training images skipped, more than the limit of {limit} "
            f"(at iteration {iteration}; see the warnings above); fix the dataset or raise --max-bad-images"
        )


def _validate(
    net: nn.Module,
    val_ann: str | os.PathLike[str],
    val_images: str | os.PathLike[str],
    *,
    out: Path,
    iteration: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
) -> dict[str, float]:
    """COCO statistics of ``net`` on the validation split (results in ``out/eval/``); leaves ``net`` in eval mode."""
    from atssdet.evaluation import evaluate  # evaluation pulls in pycocotools: only when validating

    report = evaluate(
        net,
        val_ann,
        val_images,
        batch_size=batch_size,
        device=device,
        out=out / "eval" / f"iter_{iteration:08d}.results.json",
        num_workers=num_workers,
        progress=False,
    )
    return report.stats
