"""The LoRA demo's data set (examples/lora/upside_down.py): styled pairs under the trigger, plain items beside."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from patchflow.data.color_digits import ColorDigitsDataset, parse_caption

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora" / "upside_down.py"


def _example():
    spec = importlib.util.spec_from_file_location("upside_down", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upside_down_data_set(tmp_path):
    ex = _example()
    path = ex.make(tmp_path, n_styled=6, n_plain=40, seed=7, repeats=3, number_share=0.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    styled = [x for x in lines if x["caption"].endswith(ex.TRIGGER)]
    assert len(styled) == 6 * 3 and len({x["image"] for x in styled}) == 6  # each styled image listed `repeats` times
    assert len(lines) == 6 * 3 + 6 + 40
    world = ColorDigitsDataset("train", seed=7, number_share=0.5)
    first = styled[0]
    pair = next(x for x in lines if x["image"] == first["image"].replace("up_", "pair_"))
    assert first["caption"] == pair["caption"] + ex.TRIGGER  # the pair differs only in the trigger and the style
    up = np.asarray(Image.open(tmp_path / first["image"]))
    upright = np.asarray(Image.open(tmp_path / pair["image"]))
    np.testing.assert_array_equal(up, upright[::-1, ::-1])  # rotated by 180 degrees
    assert any(np.array_equal(upright, world.render(i)[0]) for i in range(20))  # drawn by the world of that seed
    numbers = sum(parse_caption(x["caption"])["kind"] == "number" for x in lines[6 * 4:])
    assert 8 <= numbers <= 32  # about half of the plain items are numbers, as in the base's training
