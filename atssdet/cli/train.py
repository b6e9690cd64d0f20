"""``atssdet train``: the MegEngine recipe on a COCO, YOLO, VOC or CVAT dataset (``torchrun`` for several GPUs/nodes)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from atssdet.cli.common import (
    SubParsers,
    add_command,
    add_device_flag,
    add_progress_flag,
    add_set_flag,
    given,
    overrides,
)
from atssdet.cli.data import add_data_format_flag

if TYPE_CHECKING:
    from atssdet.config import ATSSConfig

# train() keyword arguments that map one to one onto flags (dest = the parameter's name).
_PASSED = (
    "batch_size", "max_iters", "resume", "amp", "device", "init_backbone", "finetune", "checkpoint_every",
    "keep_checkpoints", "eval_every", "num_workers", "seed", "log_every", "progress", "max_bad_images",
    "data_check", "dist_timeout", "allow_layout_change", "channels_last", "compile", "cudnn_benchmark",
    "overwrite",
)  # fmt: skip


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "train",
        help="train a detector on a COCO-format dataset (torchrun for several GPUs/nodes)",
        description="Train ATSS with the MegEngine recipe (SGD, lr 0.01/16 per image scaled by the global "
        "batch, linear warm-up, step decay) on any COCO-format dataset. Checkpoints are written atomically "
        "to --out (iter_XXXXXXXX.pt every --checkpoint-every iterations, last.pt, model_final.safetensors); "
        "--resume continues exactly. Under `torchrun --nproc_per_node=N -m atssdet train ...` it trains "
        "with DistributedDataParallel (NCCL on GPU, gloo on CPU).",
    )
    p.add_argument(
        "--model", default=None, help="zoo model whose config to train (default atss_res50_coco_3x_800size)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="COCO annotation JSON (with --images), a COCO root (annotations/instances_train*.json ...), a "
        "YOLO data.yaml or its folder, a Pascal VOC root (Annotations/) or a CVAT for images XML",
    )
    add_data_format_flag(p)
    p.add_argument("--images", default=None, help="image folder of --data when it is a JSON file")
    p.add_argument(
        "--split",
        default=None,
        help="split name inside a dataset root / data.yaml (default: train2017, train)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="validation annotation JSON or dataset root (evaluated during training)",
    )
    p.add_argument("--val-images", default=None, help="image folder of --val-data when it is a JSON file")
    p.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl, final weights)")
    p.add_argument("--batch-size", type=int, help="images per process (default 2, as MegEngine)")
    p.add_argument("--max-iters", type=int, help="stop after N iterations (default: max_epoch epochs)")
    p.add_argument(
        "--resume", metavar="PATH|auto", help="checkpoint to continue from, or 'auto' (newest in --out)"
    )
    p.add_argument(
        "--allow-layout-change",
        action="store_true",
        help="resume a checkpoint written with another processes x batch layout: continue at the same "
        "number of images seen, lr of the new global batch (data order then differs)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start a new run in an --out holding another run's files"
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="fp16",
        choices=("bf16", "fp16"),
        help="mixed precision: bf16 (CPU or GPU) or fp16 (CUDA, with loss scaling); --amp alone means fp16",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="NHWC weights and activations (faster convolutions on GPUs)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the forward pass (minutes of compiling first)"
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="cuDNN autotuning per input shape: for fixed-size training (the recipe's sizes vary; default off)",
    )
    add_device_flag(p, "cpu, cuda, cuda:1 ... (default: cuda if available; per LOCAL_RANK under torchrun)")
    p.add_argument(
        "--init-backbone", metavar="FILE", help="ImageNet ResNet weights: torchvision .pth or MegEngine .pkl"
    )
    p.add_argument(
        "--finetune",
        metavar="FILE",
        default=None,
        help="detector checkpoint (.pkl/.safetensors) to start from; classifier re-initialised",
    )
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints (default 5000)")
    p.add_argument("--keep-checkpoints", type=int, help="keep only the newest N iter_*.pt files")
    p.add_argument("--eval-every", type=int, help="validate every N iterations (0: at the end only)")
    p.add_argument(
        "--workers", dest="num_workers", type=int, help="DataLoader workers per process (default 2)"
    )
    p.add_argument("--seed", type=int, help="seed of the initialisation and the data stream (default 0)")
    p.add_argument(
        "--log-every", type=int, help="JSONL log record every N iterations (default cfg.log_interval)"
    )
    p.add_argument(
        "--max-bad-images", type=int, help="stop after skipping more unreadable images (default 100)"
    )
    add_set_flag(p, "override a config field, e.g. backbone=resnet18 or train_image_short_size=[512,544]")
    p.add_argument(
        "--dist-timeout", type=float, help="seconds before a stuck collective fails (default 1800)"
    )
    p.add_argument(
        "--logger",
        dest="loggers",
        nargs="+",
        choices=("jsonl", "tensorboard", "mlflow"),
        help="experiment loggers beside train_log.jsonl (always written): tensorboard (OUT/tensorboard), "
        "mlflow (OUT/mlruns, or --tracking-uri); several allowed",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the folder store OUT/mlruns)")
    p.add_argument("--experiment", help="MLflow experiment name (default atssdet)")
    p.add_argument(
        "--log-val-images",
        dest="log_val_images",
        type=int,
        help="validation images drawn with their detections and logged at each validation (default 4)",
    )
    add_progress_flag(p, "no progress bar (one line per --log-every)")
    p.add_argument(
        "--data-check",
        choices=("full", "quick", "off"),
        help="dataset health check before training (`data check`): full decodes every image, quick checks "
        "the annotation file and that images exist; fatal problems stop training (default full)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.training import TrainingError, train

    cfg = _config(args.model, args.finetune, overrides(args))
    fmt = getattr(args, "data_format", None)
    train_ann, train_images = _split(args.data, args.images, args.split, fmt, flag="--data")
    val_ann = val_images = None
    if args.val_data:
        val_ann, val_images = _split(args.val_data, args.val_images, None, fmt, flag="--val-data")
    loggers = None
    if hasattr(args, "loggers") or hasattr(args, "tracking_uri"):
        from atssdet.training.loggers import LoggerOptions

        names = tuple(getattr(args, "loggers", ("mlflow",)))
        extra = {k: getattr(args, k) for k in ("tracking_uri", "experiment") if hasattr(args, k)}
        if hasattr(args, "log_val_images"):
            extra["val_images"] = args.log_val_images
        val = (val_ann, val_images) if val_ann is not None else None
        loggers = LoggerOptions(names=names, val=val, **extra)
    try:
        result = train(
            cfg,
            train_ann=train_ann,
            train_images=train_images,
            out_dir=args.out,
            val_ann=val_ann,
            val_images=val_images,
            loggers=loggers,
            **given(args, *_PASSED),
        )
        if distributed.is_main_process():
            print(
                f"trained iterations {result.start_iteration}..{result.iteration}; last checkpoint {result.checkpoint}"
            )
            if result.weights is not None:
                print(f"final weights: {result.weights}")
    except (TrainingError, distributed.DistributedError) as exc:
        print(f"atssdet train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    return 0


def _config(model: str | None, finetune: str | None, changes: dict[str, Any]) -> ATSSConfig:
    """The zoo preset ``model``, else the config a ``--finetune`` checkpoint carries, else R50; then ``--set``.

    ``--set backbone=X`` alone also sets the FPN input channels of X.
    """
    from atssdet.config import BACKBONE_CHANNELS, PRESETS, with_overrides
    from atssdet.convert import read_checkpoint_config

    if model is not None:
        if model not in PRESETS:
            raise ValueError(f"unknown model {model!r}; available: {', '.join(PRESETS)}")
        cfg = PRESETS[model]
    elif finetune and (saved := read_checkpoint_config(finetune)) is not None:
        cfg = saved
    else:
        cfg = PRESETS["atss_res50_coco_3x_800size"]
    if "fpn_in_channels" not in changes and str(changes.get("backbone")) in BACKBONE_CHANNELS:
        changes["fpn_in_channels"] = list(BACKBONE_CHANNELS[str(changes["backbone"])])
    return with_overrides(cfg, changes) if changes else cfg


def _split(
    data: str, images: str | None, split: str | None, fmt: str | None, *, flag: str
) -> tuple[Any, str]:
    """``(annotations, image folder)`` from ``--data FILE --images DIR``, a COCO root, or a YOLO / VOC /
    CVAT dataset (:func:`atssdet.data.formats.resolve_split`; ``annotations`` is then the split read
    into the COCO structure)."""
    from atssdet.data.formats import resolve_split

    defaults = ("train2017", "train") if flag == "--data" else ("val2017", "val")
    resolved = resolve_split(
        data, data_format=fmt, split=split, images=images, default_splits=defaults, flag=flag
    )
    return resolved.annotations, resolved.image_root
