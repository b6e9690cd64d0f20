"""resize_bilinear_opencv == cv2.resize(INTER_LINEAR) on uint8, bit for bit (the ONNX --raw-input resize)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from atssdet.data.transforms import get_hw_by_short_size
from atssdet.ops.images import resize_bilinear_opencv

SIZES = [
    (612, 459), (459, 612), (1000, 700), (213, 160), (37, 53), (1, 1), (2, 3), (800, 1333),
    (1600, 2400), (3000, 200), (5, 4000), (97, 1201),
]  # fmt: skip


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_matches_cv2_resize_at_the_test_size(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 7919 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    h, w = get_hw_by_short_size(height, width, 800, 1333)
    want = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    got = resize_bilinear_opencv(torch.from_numpy(image), h, w).numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_matches_cv2_on_arbitrary_sizes_and_channels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        channels = int(rng.choice([1, 3, 4]))
        image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        want = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, channels)
        np.testing.assert_array_equal(resize_bilinear_opencv(torch.from_numpy(image), h, w).numpy(), want)


def test_rejects_other_inputs() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[H, W, C\] image, got torch.float32 \(4, 4, 3\)"):
        resize_bilinear_opencv(torch.zeros(4, 4, 3), 2, 2)
    with pytest.raises(ValueError, match=r"got torch.uint8 \(1, 4, 4, 3\)"):
        resize_bilinear_opencv(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), 2, 2)


def test_float_bilinear_would_not_do() -> None:
    """Why the fixed-point emulation: torch's float bilinear differs from OpenCV on ~10 % of pixels."""
    image = np.random.default_rng(1).integers(0, 256, (612, 459, 3), dtype=np.uint8)
    want = cv2.resize(image, (800, 1067), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    approx = torch.nn.functional.interpolate(x, size=(1067, 800), mode="bilinear", align_corners=False)
    approx_u8 = approx.round().clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()
    assert (approx_u8 != want).mean() > 0.05


def test_same_bits_in_onnx_runtime(tmp_path) -> None:
    """Traced to ONNX with dynamic sizes (as export --raw-input does), ONNX Runtime gives cv2's bits too."""
    import onnxruntime as ort

    class Resize(torch.nn.Module):
        def forward(self, image: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
            return resize_bilinear_opencv(image, size[0], size[1])

    path = tmp_path / "resize.onnx"
    example = (torch.zeros(213, 160, 3, dtype=torch.uint8), torch.tensor([1065, 800]))
    torch.onnx.export(
        Resize(), example, str(path), input_names=["image", "size"], opset_version=17, dynamo=False,
        dynamic_axes={"image": {0: "h", 1: "w"}},
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for height, width in [(612, 459), (1000, 700), (37, 53), (1600, 2400)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        h, w = get_hw_by_short_size(height, width, 800, 1333)
        (got,) = session.run(None, {"image": image, "size": np.array([h, w], dtype=np.int64)})
        np.testing.assert_array_equal(got, cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
