import time, torch
from atssdet.config import ATSSConfig, BACKBONE_CHANNELS
from atssdet.modeling import ATSS
from atssdet.criterion import atss_loss
from atssdet.data.coco import COCODetection
from atssdet.data.transforms import TrainTransform
from atssdet.data.loader import build_train_loader
from atssdet.data.synth import SHAPE_CLASSES
import sys
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
bb="resnet18_w16"
cfg = ATSSConfig(backbone=bb, backbone_norm="BN", backbone_freeze_at=0, fpn_in_channels=BACKBONE_CHANNELS[bb], fpn_out_channels=64, fpn_top_in_channel=64,
    num_classes=6, class_names=SHAPE_CLASSES, head_num_convs=2, head_norm_groups=16, train_image_short_size=(160,), train_image_max_size=200)
model = ATSS(cfg)
ds = COCODetection("/tmp/demo_ds_b/annotations/instances_train.json", "/tmp/demo_ds_b/train", remove_images_without_annotations=True,
                   transform=TrainTransform(short_sizes=cfg.train_image_short_size, max_size=cfg.train_image_max_size))
batch = next(iter(build_train_loader(ds, batch_size=8, seed=0, num_workers=0)))
tg=[{"boxes": t.boxes, "labels": t.labels} for t in batch.targets]
def T(f, n=5):
    c=time.process_time(); w=time.time()
    for _ in range(n): r=f()
    return (time.process_time()-c)/n, (time.time()-w)/n, r
print("fwd", T(lambda: model(batch.images))[:2])
out = model(batch.images)
print("loss(detached out)", T(lambda: atss_loss(type(out)(*[x.detach() if torch.is_tensor(x) else x for x in out]), tg, cfg))[:2])
def step():
    o=model(batch.images); l=atss_loss(o,tg,cfg)["total_loss"]; l.backward()
print("fwd+loss+bwd", T(step)[:2])
with torch.profiler.profile() as prof:
    step()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
