"""``atssdet export``: ONNX (fp32/fp16/int8), OpenVINO IR or a TensorRT engine, decoding (and optionally NMS) inside."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command, add_model_flags, given


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "export",
        help="export a model to ONNX, OpenVINO or TensorRT, fp32/fp16/int8 (decoding, optionally NMS, inside)",
        description="Export an ATSS model to ONNX. Inputs: images [N,3,H,W] float raw BGR 0-255, image_hw "
        "[N,2], orig_hw [N,2] (the graph pads to /32 and normalises). Outputs: scores [N,A,C] and boxes "
        "[N,A,4] in original pixels, or with --with-nms detections [N,K,6] and num_detections [N].",
    )
    add_model_flags(
        p,
        model_help="zoo model (pretrained weights unless --weights)",
        weights_help="checkpoint (.pkl/.pkl.gz/.safetensors/.pt); .safetensors carries its config",
    )
    p.add_argument(
        "--format",
        choices=["onnx", "openvino", "tensorrt"],
        default=argparse.SUPPRESS,
        help="onnx (.onnx), openvino (.xml IR + .bin) or tensorrt (engine; needs CUDA and tensorrt); default onnx",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "int8"],
        default=argparse.SUPPRESS,
        help="default fp32; fp16: float16 weights/compute where it is safe; bf16: openvino only (CPUs with "
        "bf16); int8: static quantization calibrated on --calibration",
    )
    p.add_argument(
        "--calibration", metavar="DIR", default=argparse.SUPPRESS, help="folder of calibration images (int8)"
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS,
        help="use the first N readable images of --calibration (default 300)",
    )
    p.add_argument(
        "--keep-float",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS,
        help="int8: keep the N convolutions a per-layer sensitivity pass ranks least robust in float "
        "(prints the ranking; default 0)",
    )
    p.add_argument("--out", required=True, help="output file, written atomically")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file that export did not write"
    )
    p.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symbolic batch/height/width (default); --no-dynamic fixes batch 1 and --input-hw",
    )
    p.add_argument(
        "--input-hw", type=int, nargs=2, default=None, metavar=("H", "W"), help="example/fixed input size"
    )
    p.add_argument("--with-nms", action="store_true", help="put threshold, NMS and top-k in the graph")
    p.add_argument("--class-agnostic", action="store_true", help="NMS across classes (with --with-nms)")
    p.add_argument("--score-threshold", type=float, help="default: the config's test_cls_threshold")
    p.add_argument("--nms-threshold", type=float, help="default: the config's test_nms")
    p.add_argument("--max-detections", type=int, help="default: the config's test_max_boxes_per_image")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument(
        "--raw-input",
        action="store_true",
        help="input one uint8 image [H,W,3] BGR as read by cv2.imread; the graph resizes it (bit-exact "
        "cv2.INTER_LINEAR) and returns boxes in its pixels (--input-hw: the example image size)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet.export import COMMAND
    from atssdet.export_formats import check_request, export_model, output_files
    from atssdet.guard import OutputGuard
    from atssdet.loader import load
    from atssdet.runtime.ort_runner import onnx_signature

    if args.model is None and args.weights is None:
        raise ValueError("give --model NAME and/or --weights FILE")
    overwrite = getattr(args, "overwrite", False)
    fmt, precision = getattr(args, "format", "onnx"), getattr(args, "precision", "fp32")
    inputs = [args.weights] if args.weights else []
    # Before the model loads: the outputs (never an input, nor a file export did not write), then the request.
    OutputGuard(COMMAND, inputs=inputs, overwrite=overwrite).check(output_files(fmt, args.out))
    check_request(
        fmt,
        precision,
        args.out,
        calibration=getattr(args, "calibration", None),
        raw_input=getattr(args, "raw_input", False),
        **given(args, "calibration_images", "keep_float"),
    )
    model = load(args.model, weights=args.weights, pretrained=args.weights is None)
    # Exported on CPU: the graph does not depend on the device it was traced on.
    example_hw = tuple(args.input_hw) if args.input_hw else None  # None: export.default_example_hw
    out = export_model(
        model,
        args.out,
        format=fmt,
        precision=precision,
        dynamic=args.dynamic,
        example_hw=example_hw,
        model_name=args.model,
        overwrite=overwrite,
        **given(
            args,
            "with_nms",
            "opset",
            "score_threshold",
            "nms_threshold",
            "max_detections",
            "class_agnostic",
            "raw_input",
            "calibration",
            "calibration_images",
            "keep_float",
        ),
    )
    print(f"wrote {', '.join(str(p) for p in output_files(fmt, out))}")
    if fmt == "onnx":
        print(onnx_signature(out))
    return 0
