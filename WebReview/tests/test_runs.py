"""Putting a run's outputs in place (anymc3d_review.runs): never through a link, never outside FOLDER, never over a
file, all or nothing; a heatmap named by a result and by its finding copied once."""

import json
import os
from types import SimpleNamespace

import pytest
from anymc3d_review.runs import remove_saved, save_job_outputs


def make_job(tmp_path, findings=True):
    """A finished job's folder as the Logic leaves it: one record whose result's heatmap is also its first
    finding's (what a gradient method writes), and a second finding's map."""
    job_dir = tmp_path / "job"
    (job_dir / "heatmaps").mkdir(parents=True)
    first, second = job_dir / "heatmaps" / "case__p__a.nrrd", job_dir / "heatmaps" / "case__p__b.nrrd"
    first.write_bytes(b"map a")
    second.write_bytes(b"map b")
    result = {"heatmap": str(first), "finding_heatmaps": {"a": str(first), "b": str(second)} if findings else {}}
    (job_dir / "out.json").write_text(json.dumps([{"image": "x", "results": [result]}]))
    return SimpleNamespace(jsonPath=str(job_dir / "out.json"), heatmapDir=str(job_dir / "heatmaps"))


def folder_with_results(tmp_path):
    folder = tmp_path / "FOLDER"
    (folder / "results" / "heatmaps").mkdir(parents=True)
    return folder


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_heatmap_named_by_a_result_and_its_finding_is_copied_once(tmp_path):
    job, folder = make_job(tmp_path), folder_with_results(tmp_path)
    saved = save_job_outputs(job, folder, folder / "results" / "case.json", folder / "results" / "heatmaps")
    assert files_under(folder / "results") == ["case.json", "heatmaps", "heatmaps/case__p__a.nrrd",
                                               "heatmaps/case__p__b.nrrd"]
    record = json.loads((folder / "results" / "case.json").read_text(encoding="utf-8"))[0]["results"][0]
    heatmaps = folder / "results" / "heatmaps"
    assert record["heatmap"] == record["finding_heatmaps"]["a"] == str(heatmaps / "case__p__a.nrrd")
    assert (heatmaps / "case__p__b.nrrd").read_bytes() == b"map b"
    assert len(saved) == 3
    remove_saved(saved)  # what a failed import does afterwards: nothing is left
    assert files_under(folder / "results") == ["heatmaps"]


def test_links_planted_at_every_guessable_name_are_never_followed(tmp_path):
    job, folder = make_job(tmp_path), folder_with_results(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("a", "b", "c", "d")}
    for victim in victims.values():
        victim.write_text("precious")
    results, heatmaps = folder / "results", folder / "results" / "heatmaps"
    os.symlink(victims["a"], results / ".case.json.partial")         # the old fixed temporary names
    os.symlink(victims["b"], heatmaps / ".case__p__a.nrrd.partial")
    os.symlink(victims["c"], heatmaps / ".case__p__b.nrrd.partial")
    save_job_outputs(job, folder, results / "case.json", heatmaps)
    assert all(victim.read_text(encoding="utf-8") == "precious" for victim in victims.values())
    assert not (results / "case.json").is_symlink() and json.loads((results / "case.json").read_text(encoding="utf-8"))
    # a link at a final name (even dangling) is an existing name: refused, the link's target untouched
    job2, other = make_job(tmp_path / "2"), folder_with_results(tmp_path / "2")
    os.symlink(outside / "new-file", other / "results" / "heatmaps" / "case__p__b.nrrd")
    with pytest.raises(ValueError, match="never overwritten"):
        save_job_outputs(job2, other, other / "results" / "case.json", other / "results" / "heatmaps")
    assert not (outside / "new-file").exists()
    assert files_under(other / "results") == ["heatmaps", "heatmaps/case__p__b.nrrd"]


def test_a_results_folder_leading_out_of_folder_is_refused(tmp_path):
    job = make_job(tmp_path)
    folder, outside = tmp_path / "FOLDER", tmp_path / "elsewhere"
    folder.mkdir()
    (outside / "heatmaps").mkdir(parents=True)
    os.symlink(outside, folder / "results")
    with pytest.raises(ValueError, match="outside"):
        save_job_outputs(job, folder, folder / "results" / "case.json", folder / "results" / "heatmaps")
    assert files_under(outside) == ["heatmaps"]


def test_an_output_that_cannot_be_put_in_place_leaves_no_file_behind(tmp_path):
    """The second heatmap's name is taken: the first heatmap, already copied, goes again; no partial stays."""
    job, folder = make_job(tmp_path), folder_with_results(tmp_path)
    heatmaps = folder / "results" / "heatmaps"
    (heatmaps / "case__p__b.nrrd").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="never overwritten"):
        save_job_outputs(job, folder, folder / "results" / "case.json", heatmaps)
    assert files_under(folder / "results") == ["heatmaps", "heatmaps/case__p__b.nrrd"]
    assert (heatmaps / "case__p__b.nrrd").read_bytes() == b"someone else's"


def test_a_race_at_link_time_rolls_back_what_was_linked(tmp_path, monkeypatch):
    """A name taken between the check and the link (the race the hard link guards): everything this run linked
    is removed, the other file kept."""
    import anymc3d_review.runs as runs

    job, folder = make_job(tmp_path), folder_with_results(tmp_path)
    heatmaps = folder / "results" / "heatmaps"
    real_link = runs.link_new

    def racing_link(source, target):
        if target.endswith("case.json"):
            (folder / "results" / "case.json").write_text("appeared meanwhile")
        return real_link(source, target)

    monkeypatch.setattr(runs, "link_new", racing_link)
    with pytest.raises(ValueError, match="never overwritten"):
        save_job_outputs(job, folder, folder / "results" / "case.json", heatmaps)
    assert files_under(folder / "results") == ["case.json", "heatmaps"]
    assert (folder / "results" / "case.json").read_text(encoding="utf-8") == "appeared meanwhile"
