"""The review's per-case DICOM download (anymc3d_review.dicom_download) behind the real access guard's middleware:
the key or its cookie is needed, a foreign Origin is refused, only the case's own .dcm files inside the folder are
served (a link or a path outside the folder gives nothing), and the zip holds them byte for byte."""

import io
import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from anymc3d_review import dicom_download
from anymc3d_review.cases import CaseFolder
from anymc3d_review.guard import KEY_PARAMETER, AccessGuard


def _files(root):
    case = root / "results" / "dicom" / "case1"
    case.mkdir(parents=True)
    (case / "sr.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"report")
    (case / "pm__demo.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 50)
    return [case / "sr.dcm", case / "pm__demo.dcm"]


def _get(folder, path, **kwargs):
    """One request to an app with the guard's middleware and the download route, as the review builds it."""
    guard = AccessGuard("k" * 40)
    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get(dicom_download.ROUTE, dicom_download.handler(lambda: folder))

    async def go():
        async with TestClient(TestServer(app)) as client:
            response = await client.get(path.replace("KEY", guard.key), **kwargs)
            return response.status, await response.read(), response.headers

    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # a loop of its own: an earlier test's browser may run one in this thread
        return pool.submit(asyncio.run, go()).result()


@pytest.fixture
def review(tmp_path):
    root = tmp_path / "review"
    files = _files(root)
    return CaseFolder(_folder_again(root, files)), files


def _folder_again(root, files):
    """A review folder with one case whose record lists ``files`` as its DICOM objects."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32)), str(root / "case1.nii.gz"))
    record = {"image": str(root / "case1.nii.gz"), "status": "ok", "error": None, "slicing_axis": 2, "num_slices": 3,
              "results": [], "dicom": [str(p) for p in files]}
    (root / "results" / "r.json").write_text(json.dumps([record]))
    return root


def test_the_case_zip_holds_its_files_and_needs_the_key(review):
    folder, files = review
    assert folder.cases[0].record["dicom"] == [str(p) for p in files]
    status, body, headers = _get(folder, f"/dicom/0?{KEY_PARAMETER}=KEY")
    assert status == 200 and headers["Content-Type"] == "application/zip"
    assert 'filename="case1.nii.gz_dicom.zip"' in headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.namelist() == ["case1.nii.gz/sr.dcm", "case1.nii.gz/pm__demo.dcm"]
        assert [archive.read(n) for n in archive.namelist()] == [p.read_bytes() for p in files]
    assert _get(folder, "/dicom/0")[0] == 403  # no key, no cookie
    assert _get(folder, f"/dicom/0?{KEY_PARAMETER}=wrong")[0] == 403
    assert _get(folder, f"/dicom/0?{KEY_PARAMETER}=KEY", headers={"Origin": "http://evil.example"})[0] == 403


@pytest.mark.parametrize("index", ["1", "-1", "..%2F0", "0x0", "99999999999999999999"])
def test_an_index_that_is_not_a_case_serves_nothing(review, index):
    folder, _ = review
    status, body, _ = _get(folder, f"/dicom/{index}?{KEY_PARAMETER}=KEY")
    assert status == 404 and b"DICM" not in body


def test_a_link_or_a_file_outside_the_folder_is_never_served(tmp_path):
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"\0" * 128 + b"DICM" + b"not yours")
    root = tmp_path / "review"
    files = _files(root)
    files[1].unlink()
    files[1].symlink_to(secret)  # a link inside the folder to a file outside it
    folder = CaseFolder(_folder_again(root, files))
    status, body, _ = _get(folder, f"/dicom/0?{KEY_PARAMETER}=KEY")
    assert status == 404 and b"not yours" not in body
    folder = CaseFolder(_folder_again(root, [files[0], secret]))  # a record naming a file outside the folder
    status, body, _ = _get(folder, f"/dicom/0?{KEY_PARAMETER}=KEY")
    assert status == 404 and b"not yours" not in body


@pytest.mark.slow
def test_a_real_review_server_serves_what_predict_dicom_wrote(demo_source, tmp_path):
    """predict --dicom into FOLDER/results/dicom on a DICOM series case, then the review server: the case's zip
    with its key (the objects predict wrote, byte for byte), nothing without it."""
    import importlib.util
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from anymc3d_review.testing import ReviewServer, http_status

    spec = importlib.util.spec_from_file_location(
        "dicom_series", Path(__file__).resolve().parents[2] / "python_backend" / "tests" / "dicom_series.py")
    series = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(series)
    root = tmp_path / "review"
    series.write_series(root / "ct", np.random.default_rng(0).normal(0, 100, (5, 16, 16)).astype(np.int16))
    completed = subprocess.run([sys.executable, "-m", "anymc3d", "predict", str(root / "ct"), "--backbone",
                                str(demo_source / "backbone.safetensors"), "--plugin", str(demo_source / "plugin.anymc3d"),
                                "--heatmap", str(root / "results" / "heatmaps"), "--dicom", str(root / "results" / "dicom"),
                                "--json", str(root / "results" / "r.json"), "--progress", "none", "--device", "cpu"],
                               capture_output=True, text=True, encoding="utf-8", timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (record,) = json.loads((root / "results" / "r.json").read_text(encoding="utf-8"))
    with ReviewServer(root, log=tmp_path / "server.log") as server:
        assert http_status(server.base + "dicom/0") == 403
        with urllib.request.urlopen(server.base + f"dicom/0?{KEY_PARAMETER}={server.key}", timeout=30) as response:
            body = response.read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert [n.split("/", 1)[1] for n in archive.namelist()] == [Path(p).name for p in record["dicom"]]
        assert [archive.read(n) for n in archive.namelist()] == [Path(p).read_bytes() for p in record["dicom"]]
