"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from atssdet.zoo import ZOO


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a MegEngine .pkl checkpoint to safetensors",
        description="Read a MegEngine checkpoint with a restricted unpickler (no code runs), check every "
        "key and shape against the model, and write an atssdet .safetensors file.",
    )
    p.add_argument("src", help="MegEngine .pkl (or .pkl.gz) checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model the checkpoint belongs to")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from atssdet.convert import convert_checkpoint
    from atssdet.zoo import get_entry

    out = convert_checkpoint(args.src, args.dst, get_entry(args.model).config)
    print(f"wrote {out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (decoding, optionally NMS, inside the graph)",
        description="Export an ATSS model to ONNX. Inputs: images [N,3,H,W] float raw BGR 0-255, image_hw "
        "[N,2], orig_hw [N,2] (the graph pads to /32 and normalises). Outputs: scores [N,A,C] and boxes "
        "[N,A,4] in original pixels, or with --with-nms detections [N,K,6] and num_detections [N].",
    )
    p.add_argument("--model", choices=sorted(ZOO), help="zoo model (pretrained weights unless --weights)")
    p.add_argument(
        "--weights", help="checkpoint (.pkl/.pkl.gz/.safetensors/.pt); .safetensors carries its config"
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="output file, written atomically")
    p.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symbolic batch/height/width (default); --no-dynamic fixes batch 1 and --input-hw",
    )
    p.add_argument("--input-hw", type=int, nargs=2, metavar=("H", "W"), help="example/fixed input size")
    p.add_argument("--with-nms", action="store_true", help="put threshold, NMS and top-k in the graph")
    p.add_argument("--class-agnostic", action="store_true", help="NMS across classes (with --with-nms)")
    p.add_argument("--score-threshold", type=float, help="default: the config's test_cls_threshold")
    p.add_argument("--nms-threshold", type=float, help="default: the config's test_nms")
    p.add_argument("--max-detections", type=int, help="default: the config's test_max_boxes_per_image")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from atssdet.export import export_onnx, onnx_signature

    if args.model is None and args.weights is None:
        raise ValueError("give --model NAME and/or --weights FILE")
    if args.model is not None:
        from atssdet.zoo import load

        model = load(args.model, pretrained=args.weights is None, weights=args.weights)
    else:
        from atssdet.convert import load_weights, read_checkpoint_config
        from atssdet.modeling.atss import build_model

        cfg = read_checkpoint_config(args.weights)
        if cfg is None:
            raise ValueError(f"{args.weights}: carries no config (only .safetensors do); add --model NAME")
        model = build_model(cfg).eval()
        load_weights(model, args.weights)
    # Exported on CPU: the graph does not depend on the device it was traced on.
    example_hw = tuple(args.input_hw) if args.input_hw else ((213, 160) if args.dynamic else (800, 1333))
    out = export_onnx(
        model,
        args.out,
        dynamic=args.dynamic,
        with_nms=args.with_nms,
        opset=args.opset,
        score_threshold=args.score_threshold,
        nms_threshold=args.nms_threshold,
        max_detections=args.max_detections,
        class_agnostic=args.class_agnostic,
        example_hw=example_hw,
        model_name=args.model,
    )
    print(f"wrote {out}")
    print(onnx_signature(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atssdet.convert import CheckpointError

    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"atssdet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
