import argparse, json, math, time, resource, sys
import torch
from atssdet.config import ATSSConfig, BACKBONE_CHANNELS
from atssdet.modeling import ATSS
from atssdet.criterion import atss_loss
from atssdet.data.coco import COCODetection
from atssdet.data.transforms import TrainTransform
from atssdet.data.loader import build_train_loader
from atssdet.data.synth import SHAPE_CLASSES
from atssdet.evaluate import evaluate

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--backbone", default="resnet18_w32")
ap.add_argument("--norm", default="BN")
ap.add_argument("--fpn", type=int, default=64)
ap.add_argument("--convs", type=int, default=2)
ap.add_argument("--groups", type=int, default=16)
ap.add_argument("--short", type=int, nargs="+", default=[128, 144, 160])
ap.add_argument("--maxsize", type=int, default=200)
ap.add_argument("--test-short", type=int, default=144)
ap.add_argument("--test-max", type=int, default=200)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--opt", default="adamw")
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--wd", type=float, default=1e-4)
ap.add_argument("--iters", type=int, default=500)
ap.add_argument("--warmup", type=int, default=100)
ap.add_argument("--sched", default="cosine")
ap.add_argument("--eval-every", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--workers", type=int, default=0)
ap.add_argument("--topk", type=int, default=9)
ap.add_argument("--anchor-scale", type=int, default=8)
ap.add_argument("--clip", type=float, default=0.0)
ap.add_argument("--speed-only", action="store_true")
ap.add_argument("--save", default="")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = ATSSConfig(
    backbone=a.backbone, backbone_norm=a.norm, backbone_freeze_at=0,
    fpn_in_channels=BACKBONE_CHANNELS[a.backbone], fpn_out_channels=a.fpn, fpn_top_in_channel=a.fpn,
    num_classes=len(SHAPE_CLASSES), class_names=SHAPE_CLASSES,
    head_num_convs=a.convs, head_norm_groups=a.groups, anchor_topk=a.topk, anchor_scale=a.anchor_scale,
    train_image_short_size=tuple(a.short), train_image_max_size=a.maxsize,
    test_image_short_size=a.test_short, test_image_max_size=a.test_max,
)
model = ATSS(cfg)
print("params", sum(p.numel() for p in model.parameters()), flush=True)
ds = COCODetection(f"{a.data}/annotations/instances_train.json", f"{a.data}/train", remove_images_without_annotations=True,
                   transform=TrainTransform(short_sizes=cfg.train_image_short_size, max_size=cfg.train_image_max_size))
loader = build_train_loader(ds, batch_size=a.batch, seed=0, num_workers=a.workers)
params = [p for p in model.parameters() if p.requires_grad]
decay = [p for p in params if p.ndim > 1]; nodecay = [p for p in params if p.ndim <= 1]
groups = [{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}]
if a.opt == "adamw":
    opt = torch.optim.AdamW(groups, lr=a.lr)
else:
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=a.wd)  # as the trainer
def lr_at(it):
    w = min(1.0, (it + 1) / a.warmup) if a.warmup else 1.0
    if a.sched == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * it / a.iters))
    elif a.sched == "step":
        f = 0.1 if it >= 0.8 * a.iters else 1.0
    else:
        f = 1.0
    return a.lr * w * max(f, 0.0)
def val():
    t = time.time(); c = time.process_time()
    r = evaluate(model, f"{a.data}/annotations/instances_val.json", f"{a.data}/val", batch_size=16, progress=False, num_workers=1)
    model.train()
    return r, time.time() - t, time.process_time() - c
t0 = time.time(); c0 = time.process_time(); ema = None; tdata = 0.0
model.train()
it_loader = iter(loader)
hist = []
for it in range(a.iters):
    td = time.time()
    batch = next(it_loader)
    tdata += time.time() - td
    for g in opt.param_groups: g["lr"] = lr_at(it)
    out = model(batch.images)
    losses = atss_loss(out, [{"boxes": t.boxes, "labels": t.labels} for t in batch.targets], cfg)
    opt.zero_grad(set_to_none=True)
    losses["total_loss"].backward()
    if a.clip: torch.nn.utils.clip_grad_norm_(params, a.clip)
    opt.step()
    l = float(losses["total_loss"]); ema = l if ema is None else 0.95 * ema + 0.05 * l
    if (it + 1) % 25 == 0 or it == 0:
        print(f"it {it+1} loss {l:.3f} ema {ema:.3f} cls {float(losses['loss_cls']):.3f} box {float(losses['loss_bbox']):.3f} "
              f"wall {time.time()-t0:.1f} cpu {time.process_time()-c0:.1f} data {tdata:.1f} imgs {tuple(batch.images.shape[2:])}", flush=True)
    if a.speed_only and it + 1 >= a.iters: break
    if a.eval_every and (it + 1) % a.eval_every == 0 and it + 1 < a.iters:
        r, tw, tc = val(); print(f"EVAL it {it+1} mAP {r.stats['AP']:.4f} AP50 {r.stats['AP50']:.4f} (eval wall {tw:.1f} cpu {tc:.1f})", flush=True)
tw, tc = time.time() - t0, time.process_time() - c0
print(f"TRAIN done wall {tw:.1f} cpu {tc:.1f} per-iter cpu {tc/a.iters:.3f}")
if a.save: torch.save(model.state_dict(), a.save)
if not a.speed_only:
    r, ew, ec = val()
    print(f"FINAL mAP {r.stats['AP']:.4f} AP50 {r.stats['AP50']:.4f} AP75 {r.stats['AP75']:.4f} APs {r.stats['APs']:.3f} APm {r.stats['APm']:.3f} APl {r.stats['APl']:.3f} eval wall {ew:.1f} cpu {ec:.1f}")
    print(json.dumps(r.per_class_ap))
