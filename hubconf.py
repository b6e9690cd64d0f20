"""torch.hub entry points: ``torch.hub.load(repo, "atss_res50_coco_3x_800size", pretrained=True)``."""

dependencies = ["torch", "torchvision", "numpy", "cv2", "safetensors"]
