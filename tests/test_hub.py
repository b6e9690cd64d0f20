from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atssdet.compat import CompatModel
from atssdet.config import PRESETS
from atssdet.modeling.atss import ATSS
from atssdet.zoo import ZOO

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(ZOO))
def test_hub_load_local_every_zoo_model(name: str, reference_dir: Path) -> None:
    model = torch.hub.load(str(REPO_ROOT), name, source="local", pretrained=False)
    assert isinstance(model, ATSS) and not model.training
    assert model.cfg == PRESETS[name]
    # Exactly the official checkpoint's layout: every key, and the same total number of values.
    manifest = json.loads((reference_dir / f"manifest_{name}.json").read_text())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(state) == {item["key"] for item in manifest["state_dict"]}
    assert sum(v.numel() for v in state.values()) == sum(
        int(torch.tensor(item["shape"]).prod()) for item in manifest["state_dict"]
    )


def test_hub_compat_wrapper() -> None:
    model = torch.hub.load(str(REPO_ROOT), "atss_res18_coco_3x_800size", source="local", compat=True)
    assert isinstance(model, CompatModel) and not model.training


def test_hub_list_shows_the_five(tmp_path: Path) -> None:
    # torch.hub.list only takes GitHub repos; it reads them from its cache folder
    # <hub_dir>/<owner>_<repo>_<ref>, so point that at this checkout (no network involved).
    (tmp_path / "megvii_atssdet_main").symlink_to(REPO_ROOT, target_is_directory=True)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        entries = torch.hub.list("megvii/atssdet:main", trust_repo=True, verbose=False)
    finally:
        torch.hub.set_dir(old)
    assert sorted(entries) == sorted(ZOO)
