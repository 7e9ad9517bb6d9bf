"""Hostile files against the readers (anymc3d.safeio and its users): JSON nested past any real file, zip members
that would inflate, oversized metadata. Each is refused with one line naming the file, before the work it would
cause (no RecursionError, nothing inflated, nothing half written)."""
from __future__ import annotations

import json
import logging
import random
import zipfile

import pytest

from anymc3d import safeio
from anymc3d.cli import main
from anymc3d.errors import PluginError
from anymc3d.plugin import JSON_NAME, WEIGHTS_NAME, read_plugin_metadata
from anymc3d.plugin_file import read_members, read_training_summary
from anymc3d.testing import write_plugin_zip

NESTED = "[" * 100_000 + "]" * 100_000  # json.loads alone: RecursionError


def reference_depth(value) -> int:
    """Nesting depth of a parsed JSON value, by recursion (the independent computation)."""
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


def random_json(rng, depth):
    kind = rng.choice(["list", "dict", "text", "number"] if depth < 12 else ["text", "number"])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {f"k{i}[{{\"": random_json(rng, depth + 1) for i in range(rng.randint(0, 3))}
    if kind == "text":
        return rng.choice(["[", "]", "{", "}", '"', "\\", "]]}}\\\"[{", "plain"])
    return rng.random()


def test_json_depth_matches_the_parsed_nesting_with_brackets_inside_strings():
    rng = random.Random(0)
    for _ in range(300):
        value = random_json(rng, 0)
        assert safeio.json_depth(json.dumps(value)) == reference_depth(value)


def test_json_limits_give_one_line_errors_naming_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"^f\.json: JSON nested deeper than 64 levels$"):
        safeio.loads(NESTED, "f.json")
    assert safeio.loads("[" * 64 + "]" * 64, "ok") is not None
    with pytest.raises(ValueError, match=r"^big: JSON larger than 10 bytes$"):
        safeio.loads(b"[1, 2, 3, 4, 5]", "big", max_bytes=10)
    path = tmp_path / "r.json"
    path.write_bytes(b" " * 2000 + b"[]")
    with pytest.raises(ValueError, match="larger than 1000 bytes"):
        safeio.read_json(path, max_bytes=1000)
    with pytest.raises(ValueError, match=r"^x is not valid JSON \(Expecting"):
        safeio.loads("{not json", "x")


@pytest.fixture
def demo_members(demo_dir):
    return read_members(demo_dir / "plugin.anymc3d")


def test_info_and_predict_on_deeply_nested_plugin_json_fail_in_one_line(demo_dir, demo_members, tmp_path, caplog):
    raw, weights = demo_members
    nested = write_plugin_zip(tmp_path / "nested.anymc3d", b'{"name": ' + NESTED.encode() + b"}", weights)
    with caplog.at_level(logging.ERROR):
        assert main(["info", str(nested)]) == 2
        out = tmp_path / "out.json"
        code = main(["predict", str(demo_dir / "volume.nii.gz"), "--backbone", str(demo_dir / "backbone.safetensors"),
                     "--plugin", str(nested), "--json", str(out), "--progress", "none", "--device", "cpu"])
    assert code != 0 and not out.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("\n" not in e and "nested deeper than 64 levels" in e and "nested.anymc3d" in e
                          for e in errors), errors
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def test_a_compressed_member_is_refused_before_a_byte_is_inflated(demo_members, tmp_path, monkeypatch):
    """A deflated member (a zip bomb's way to declare more than the file holds) is refused from the central
    directory: reading it is never tried (the inflater is replaced by one that fails the test)."""
    raw, weights = demo_members
    bomb = write_plugin_zip(tmp_path / "bomb.anymc3d", raw, b"\0" * (64 * 1024 ** 2), compress=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1024 ** 2  # 64 MB of weights in under 1 MB
    monkeypatch.setattr(zipfile, "_get_decompressor", lambda *_: pytest.fail("a member was inflated"))
    for read in (read_plugin_metadata, read_members, read_training_summary):
        with pytest.raises(PluginError, match=r"bomb\.anymc3d: member plugin\.safetensors is compressed"):
            read(bomb)
    assert main(["info", str(bomb)]) == 2


def test_member_sizes_are_checked_against_the_limits_before_reading(demo_members, tmp_path, monkeypatch):
    raw, weights = demo_members
    plugin = write_plugin_zip(tmp_path / "p.anymc3d", raw, weights)
    monkeypatch.setattr("anymc3d.plugin_file.MAX_MEMBER_BYTES", len(weights) - 1)
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *_: pytest.fail("a member was read"))
    with pytest.raises(PluginError, match="member plugin.safetensors is larger than"):
        read_members(plugin)


def test_a_plugin_folder_with_oversized_metadata_is_refused(demo_members, tmp_path):
    raw, weights = demo_members
    folder = tmp_path / "folder_plugin"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(weights)
    (folder / JSON_NAME).write_bytes(raw[:-1] + b" " * (safeio.MAX_JSON_BYTES + 1) + b"}")
    with pytest.raises(PluginError, match=r"folder_plugin.*plugin\.json: larger than 16777216 bytes"):
        read_plugin_metadata(folder)
    (folder / JSON_NAME).write_bytes(raw)
    assert read_plugin_metadata(folder)["name"]  # the same folder with its real metadata reads


def test_other_json_readers_are_limited(tmp_path):
    from anymc3d.contract import RecordError
    from anymc3d.plugin import read_ensemble_index
    from anymc3d.records import read_records

    (tmp_path / "results.json").write_text(NESTED)
    with pytest.raises(RecordError, match="nested deeper"):
        read_records(tmp_path / "results.json")
    (tmp_path / "ensemble.json").write_text('{"plugins": ' + NESTED + "}")
    with pytest.raises(PluginError, match="nested deeper"):
        read_ensemble_index(tmp_path)


def test_training_summary_header_length_is_bounded(demo_members, tmp_path):
    raw, weights = demo_members
    huge = (2 ** 62).to_bytes(8, "little") + weights[8:]
    plugin = write_plugin_zip(tmp_path / "h.anymc3d", raw, huge)
    with pytest.raises(PluginError, match=r"h\.anymc3d: unreadable training summary"):
        read_training_summary(plugin)
