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

    return asyncio.run(go())


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
