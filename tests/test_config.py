"""Config files, CLI overrides and rejection of unknown keys / wrong types."""
from pathlib import Path

import pytest
import yaml

from scse_seg.config import Config, build_config, parse_override
from scse_seg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_matches_code_defaults():
    assert yaml.safe_load((CONFIGS / "default.yaml").read_text()) == Config().to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    if "compare" in (yaml.safe_load(path.read_text()) or {}):  # a training config + a grid
        import sys
        sys.path.insert(0, str(CONFIGS.parent / "eval"))
        from compare import build_parser

        from scse_seg.grid import GridSpec

        # from_args builds and validates the training config of every run of the grid
        spec = GridSpec.from_args(build_parser().parse_args(["--config", str(path)]))
        assert "none" in spec.attns
        assert spec.seeds >= 2 or spec.folds  # a paired test needs repeated runs or folds
    else:
        build_config([path])


def test_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {arch: densenet}\ntrain: {lr: 1e-3}\n")
    cfg = build_config([f], [parse_override("train.lr=3e-4"), parse_override("model.width=8")])
    assert (cfg.model.arch, cfg.train.lr, cfg.model.width) == ("densenet", 3e-4, 8)


@pytest.mark.parametrize("override, needle", [
    ("train.epocs=3", "train.epocs"),
    ("train.epochs=-1", "train.epochs"),
    ("train.epochs=ten", "train.epochs"),
    ("model.attention=se", "model.attention"),
    ("model.arch=vnet", "model.arch"),
    ("data.slice_size=[50]", "data.slice_size"),
    ("data.patch_size=[0,32,32]", "data.patch_size"),
    ("bogus=1", "bogus"),
])
def test_rejections_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config([], [parse_override(override)])


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config([f])
    with pytest.raises(ConfigError, match="not found"):
        build_config([tmp_path / "missing.yaml"])
