"""Config hygiene: every shipped YAML merges into the full part_distill config with the values it
sets, and a mistyped key (in a file or on the command line) names itself and the closest valid key."""
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.config import CfgNode

from part_distill.engine.setup import UnknownConfigKeyError, build_cfg

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
# Keys build_cfg derives after merging: cuda falls back to cpu on a machine without a GPU; the
# detector vocabulary is given by the test (configs/imagenet name one under $DETECTRON2_DATASETS).
DERIVED = {"MODEL.DEVICE", "DATASETS.IMAGE_COLLECTION.VOCABULARY"}
# A class count of -1 in a file means "from the dataset's metadata": build_cfg fills it.
FROM_METADATA = -1


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


def _get(cfg, key):
    for name in key.split("."):
        cfg = cfg[name]
    return cfg


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def test_every_shipped_yaml_is_found():
    # The 14 files of configs/ (issue 15); a glob that silently found none would make the next test vacuous.
    assert len(YAMLS) >= 14 and "configs/parts_world/mine_parts.yaml" in YAMLS


@pytest.mark.parametrize("path", YAMLS)
def test_shipped_yaml_merges_with_its_values(path, detector_vocabulary):
    cfg = build_cfg(str(ROOT / path), ["DATASETS.IMAGE_COLLECTION.VOCABULARY", detector_vocabulary])
    # What the file sets, its _BASE_ chain resolved independently of build_cfg by detectron2's loader.
    loaded = CfgNode.load_yaml_with_base(str(ROOT / path), allow_unsafe=True)
    checked = 0
    for key, value in _leaves(loaded):
        if key in DERIVED or value == FROM_METADATA:
            continue
        # yacs reads a YAML string such as "(80,)" as a Python literal, as it does when merging.
        assert _plain(_get(cfg, key)) == _plain(CfgNode._decode_cfg_value(value)), key
        checked += 1
    assert checked > 0


def test_typo_on_the_command_line_names_the_closest_key():
    with pytest.raises(UnknownConfigKeyError) as e:
        build_cfg("", ["MODEL.DEVICE", "cpu", "MODEL.PART_DISTILL.FREEZ", "none"])
    assert str(e.value).startswith(
        "Unknown config key 'MODEL.PART_DISTILL.FREEZ'; did you mean 'MODEL.PART_DISTILL.FREEZE'?")
    # A key under the wrong parent: the closest full key, not a sibling.
    with pytest.raises(UnknownConfigKeyError, match="'MODEL.NUM_CLUSTERS'; did you mean 'MINING.NUM_CLUSTERS'"):
        build_cfg("", ["MODEL.NUM_CLUSTERS", "3"])
    with pytest.raises(UnknownConfigKeyError, match="'QQQ.ZZZ' .no similar key"):
        build_cfg("", ["QQQ.ZZZ", "3"])


def test_typo_in_a_yaml_file_names_the_key_the_hint_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{ROOT / "configs/parts_world/proposal.yaml"}"\n'
                   "MINING:\n  NUM_CLUSTER: 5\n")
    with pytest.raises(UnknownConfigKeyError) as e:
        build_cfg(str(bad))
    msg = str(e.value)
    assert "'MINING.NUM_CLUSTER'; did you mean 'MINING.NUM_CLUSTERS'?" in msg and str(bad) in msg
    # A typo in the _BASE_ file is reported too (its keys are checked with the child's).
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{bad}"\nSEED: 3\n')
    with pytest.raises(UnknownConfigKeyError, match="MINING.NUM_CLUSTERS"):
        build_cfg(str(child))


def test_the_tools_report_the_hint(tmp_path):
    # The command a user runs: exit status != 0 and the hint on stderr (not yacs' bare "Non-existent key").
    r = subprocess.run([sys.executable, str(ROOT / "tools/mine_parts.py"), "--config-file",
                        str(ROOT / "configs/parts_world/mine_parts.yaml"), "OUTPUT_DIR", str(tmp_path),
                        "MINING.NUM_CLUSTRES", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0
    assert "Unknown config key 'MINING.NUM_CLUSTRES'; did you mean 'MINING.NUM_CLUSTERS'?" in r.stderr
