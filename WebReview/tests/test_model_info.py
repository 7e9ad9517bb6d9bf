"""Model information of the review page, server side (no browser): plugin name / version / backbone / training
summary read torch-free from the plugin, untrained plugins flagged, plugin files outside the folder not opened,
the image's modality from a DICOM tag or a MetaImage field, and the modality warnings."""

import copy
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from anymc3d_review.modelinfo import (
    NOT_MEASURED,
    UNTRAINED,
    PluginInfoReader,
    image_modality,
    intended_modality,
    modality_warnings,
    record_plugins,
    training_lines,
)

#: the keys anymc3d train writes (anymc3d/training/trainer.py Trainer._finish + data.Manifest.summary), with made-up values
SUMMARY = {"manifest": "/data/lesions/manifest.csv", "manifest_sha256": "0" * 64, "task": "multilabel",
           "splits": {"train": {"cases": 40, "positives": {"lesion": 19, "calcification": 7}, "with_mask": 0},
                      "val": {"cases": 9, "positives": {"lesion": 4, "calcification": 2}, "with_mask": 0}},
           "epochs_run": 12, "epochs_max": 30, "best_epoch": 9, "best_val_auroc": 0.8125, "seconds": 38.4,
           "processes": 1, "raw_f1_thresholds": [0.4, 0.5], "youden_thresholds_validation": [0.3, 0.6],
           "val_auroc_per_label": {"lesion": 0.875, "calcification": 0.75}}


def trained_copy(source, target, summary=SUMMARY, **meta):
    """The demo plugin saved again with a training summary (and metadata changes)."""
    from anymc3d.plugin import load_plugin, save_plugin

    loaded = load_plugin(source)
    config = copy.deepcopy(loaded.config)
    for key, value in meta.items():
        setattr(config, key, value)
    return save_plugin(target, config, loaded.head, loaded.lora, training=summary)


def test_untrained_demo_plugin_is_flagged_and_its_metadata_shown(demo_source, tmp_path):
    from anymc3d.plugin import read_plugin_metadata

    folder = tmp_path / "f"
    folder.mkdir()
    plugin = shutil.copy(demo_source / "plugin.anymc3d", folder / "plugin.anymc3d")
    meta = read_plugin_metadata(plugin)  # the torch side's reading, to compare with
    info = PluginInfoReader(folder).read(str(plugin), "demo_findings")
    assert info.opened and not info.problem
    assert info.trained is False and info.training == []  # --no-train: no summary in the plugin
    assert info.name == meta["name"]
    assert meta["anymc3d_version"] in info.version and str(meta["format_version"]) in info.version
    assert "DINOv2-architecture demo, 6 blocks, width 192, random weights" in info.backbone and str(meta["backbone"]["img_size"]) in info.backbone
    assert (info.modality, info.body_part) == (meta["modality"], meta["body_part"]) == ("CT", "synthetic phantom")
    assert info.modality_source == "stated in the plugin"
    assert info.labels == ", ".join(meta["labels"])
    assert "probabilities mean nothing" in UNTRAINED


def test_training_summary_is_shown_for_a_trained_plugin(demo_source, tmp_path):
    plugin = trained_copy(demo_source / "plugin.anymc3d", tmp_path / "trained.anymc3d")
    info = PluginInfoReader(tmp_path).read(str(plugin), "x")
    assert info.trained is True
    text = "\n".join(info.training)
    assert (f"training     {SUMMARY['epochs_run']} epochs of at most {SUMMARY['epochs_max']} "
            f"(best epoch {SUMMARY['best_epoch']}), {SUMMARY['seconds']} s, 1 process(es)") in text
    # (the plugin stores the summary with sorted keys: findings in alphabetical order)
    assert ("train 40 (calcification 7 positive, lesion 19 positive); "
            "val 9 (calcification 2 positive, lesion 4 positive)") in text
    assert f"validation   AUROC {SUMMARY['best_val_auroc']:.3f} (calcification 0.750, lesion 0.875)" in text
    assert "calibrated   Platt scaling fitted on the 9 validation cases" in text
    assert "manifest.csv" in text and "/data/lesions" not in text
    assert training_lines({}) == []  # nothing invented for a summary without the known keys


def test_model_card_operating_points_and_measured_localisation_are_listed(demo_source, tmp_path):
    """What the plugin file holds beyond its training summary: the thresholds the decisions use, the validation's
    Youden thresholds and the localisation ``anymc3d eval --record-localisation`` measured (written here by the backend's own
    record_localisation from localisation.model_card, read back through the torch side to compare)."""
    from anymc3d.localisation import model_card
    from anymc3d.plugin import read_plugin_metadata, record_localisation

    summary = dict(SUMMARY, youden_thresholds_validation=[0.3, 0.6, 0.45])  # one per finding of the demo plugin
    plugin = trained_copy(demo_source / "plugin.anymc3d", tmp_path / "carded.anymc3d", summary=summary)
    before = PluginInfoReader(tmp_path).read(str(plugin), "carded")
    assert NOT_MEASURED in before.card  # never measured: said so
    assert not any(line.startswith("heatmap localisation on") for line in before.card)
    summaries = {"grad_rollout": {"cases": 6, "hit_rate": 2 / 3, "mass_over_volume_share": 4.25,
                                  "median_distance_mm": 3.5, "mean_mass_share": 0.1},
                 "attention": {"cases": 6, "hit_rate": 0.0, "mass_over_volume_share": 1.1, "median_distance_mm": 41.0}}
    record_localisation(plugin, model_card(summaries, "synthetic lesions in MNI152"))
    meta = read_plugin_metadata(plugin)
    info = PluginInfoReader(tmp_path).read(str(plugin), "carded")
    labels, thresholds = meta["labels"], meta["thresholds"]
    assert info.card[0] == "operating point: " + ", ".join(f"{label} >= {t:.2f}" for label, t in zip(labels, thresholds))
    youden = summary["youden_thresholds_validation"]
    assert info.card[1] == "Youden threshold (validation): " + ", ".join(
        f"{label} {t:.2f}" for label, t in zip(labels, youden))
    assert info.card[2] == f"heatmap localisation on synthetic lesions in MNI152: best {meta['localisation']['best']}"
    assert meta["localisation"]["best"] == "grad_rollout"  # the highest hit rate
    assert "  grad_rollout: hit rate 0.67 of 6 cases, mass 4.2x its volume share, median distance 3.5 mm" in info.card
    assert "  attention: hit rate 0.00 of 6 cases, mass 1.1x its volume share, median distance 41.0 mm" in info.card
    assert info.as_state()["card"] == info.card  # what the page's detail view lists
    assert NOT_MEASURED not in info.card


def test_the_recorded_held_out_evaluation_is_listed_one_line_per_finding(demo_source, tmp_path):
    """``anymc3d eval --record-evaluation`` stores the held-out evaluation in the plugin file; the page lists it like
    any plugin's card (written here by the backend's evaluate + evaluation_card + record_card on made-up test
    probabilities; the AUROC checked against scikit-learn, sensitivity / specificity counted by hand)."""
    from sklearn.metrics import roc_auc_score

    from anymc3d.evaluation import evaluate, evaluation_card
    from anymc3d.plugin import read_plugin_metadata, record_card

    plugin = trained_copy(demo_source / "plugin.anymc3d", tmp_path / "evaluated.anymc3d",
                          summary=dict(SUMMARY, youden_thresholds_validation=[0.3, 0.6, 0.45]))
    labels = read_plugin_metadata(plugin)["labels"]
    assert not any("held-out" in line for line in PluginInfoReader(tmp_path).read(str(plugin), "p").card)
    rng = np.random.default_rng(4)
    y, yv = rng.integers(0, 2, (40, len(labels))), rng.integers(0, 2, (20, len(labels)))
    p, pv = np.clip(0.35 * y + rng.uniform(0, 0.65, y.shape), 0, 1), rng.uniform(0, 1, yv.shape)
    metrics = evaluate(y, p, labels, [0.5] * len(labels), yv, pv, bootstrap=100)
    metrics.update(evaluated_split="test", manifest_sha256="ab" * 32)
    record_card(plugin, evaluation=evaluation_card(metrics, 100))
    card = PluginInfoReader(tmp_path).read(str(plugin), "p").card
    assert "held-out evaluation on the test split of manifest sha256 abababababababab" in card
    for k, label in enumerate(labels):
        e = metrics["per_label"][label]
        lo, hi = e["auroc_ci95"]
        points = (0.5, e["youden_threshold_from_validation"])
        hand = [((p[:, k] >= t) & (y[:, k] == 1)).sum() / y[:, k].sum() for t in points]
        spec = [((p[:, k] < t) & (y[:, k] == 0)).sum() / (1 - y[:, k]).sum() for t in points]
        assert (f"  {label}: held-out AUROC {roc_auc_score(y[:, k], p[:, k]):.2f} (95 % CI {lo:.2f}-{hi:.2f}), "
                f"sensitivity {hand[0]:.2f} / specificity {spec[0]:.2f} at 0.50; sensitivity {hand[1]:.2f} / "
                f"specificity {spec[1]:.2f} at {e['youden_threshold_from_validation']:.2f} (validation Youden), "
                f"40 cases ({int(y[:, k].sum())} positive)") in card, card


def test_plugin_files_outside_the_folder_are_opened_only_when_given_on_the_command_line(demo_source, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    outside = shutil.copy(demo_source / "plugin.anymc3d", tmp_path / "elsewhere.anymc3d")
    info = PluginInfoReader(folder).read(str(outside), "demo_findings")
    assert not info.opened and info.trained is None and "outside the review folder" in info.problem
    assert info.name == "demo_findings" and info.version == "" and info.training == []
    info = PluginInfoReader(folder, trusted=[outside]).read(str(outside), "demo_findings")
    assert info.opened and info.trained is False
    # a link inside the folder to a plugin outside it is judged by where it leads
    os.symlink(outside, folder / "link.anymc3d")
    assert not PluginInfoReader(folder).read(str(folder / "link.anymc3d")).opened
    # not a plugin, missing, relative: said so, nothing raised
    (folder / "bad.anymc3d").write_bytes(b"not a zip")
    assert "cannot be read" in PluginInfoReader(folder).read(str(folder / "bad.anymc3d")).problem
    assert "not found" in PluginInfoReader(folder).read(str(folder / "gone.anymc3d")).problem
    assert PluginInfoReader(folder).read("plugin.anymc3d").problem == "the results name no plugin file"


def test_markup_in_plugin_metadata_stays_text(demo_source, tmp_path):
    """Plugin metadata is untrusted: it reaches the page as the same characters (rendered as text by Vue's
    mustache, tested in the browser), never stripped into something else here."""
    payload = '<img src=x onerror="window.__pwned=1">'
    plugin = trained_copy(demo_source / "plugin.anymc3d", tmp_path / "p.anymc3d", name="evil" + payload,
                          description=payload, body_part=payload[:200])
    info = PluginInfoReader(tmp_path).read(str(plugin))
    assert info.name == "evil" + payload and info.description == payload


def test_intended_modality_from_metadata_or_preprocessing():
    assert intended_modality({"modality": "MR", "preprocessing": [{"intensity": "ct"}]}) == ("MR", "stated in the plugin")
    assert intended_modality({"preprocessing": [{"intensity": "ct"}]})[0] == "CT"
    assert intended_modality({"preprocessing": [{"intensity": "mri_zscore"}, {"intensity": "mri_percentile"}]})[0] == "MR"
    assert intended_modality({"preprocessing": [{"intensity": "none"}]}) == ("", "")
    assert intended_modality({"preprocessing": [{"intensity": "ct"}, {"intensity": "mri_zscore"}]}) == ("", "")


def write_dicom_series(folder, modality, image=None, series_uid="1.2.826.0.1.3680043.2.1125.7.1"):
    """A DICOM series written by SimpleITK ("Dicom Series From Array": one file per slice, per-slice position), with
    a Modality tag; ``image`` defaults to a small synthetic CT."""
    if image is None:
        from anymc3d.synthetic import make_ct_volume

        image = make_ct_volume(size=(24, 20, 6), spacing=(1.0, 1.0, 2.5), lesion=True, seed=3)
    image = sitk.Cast(image, sitk.sitkInt16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in (("0008|0060", modality), ("0020|000e", series_uid), ("0020|0011", "1"),
                           ("0020|000d", series_uid + ".9"), ("0008|0008", "DERIVED\\SECONDARY"),
                           ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0013", str(k + 1))):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def test_image_modality_from_dicom_tag_and_metaimage_field(tmp_path):
    assert image_modality(write_dicom_series(tmp_path / "mr", "MR")) == ("MR", "DICOM tag (0008,0060)")
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    data = (tmp_path / "ct.mha").read_bytes()  # SimpleITK writes no Modality line: add the MetaIO field by hand
    assert b"Modality" not in data
    (tmp_path / "ct.mha").write_bytes(data.replace(b"NDims = 3\n", b"NDims = 3\nModality = MET_MOD_CT\n", 1))
    assert image_modality(tmp_path / "ct.mha") == ("CT", "MetaImage Modality field")
    sitk.WriteImage(image, str(tmp_path / "plain.nii.gz"))
    assert image_modality(tmp_path / "plain.nii.gz") == ("", "")  # NIfTI states no modality


def test_modality_warnings(demo_source, tmp_path):
    ct_plugin = PluginInfoReader(demo_source).read(str(demo_source / "plugin.anymc3d"))
    assert ct_plugin.modality == "CT"
    # stated by the image: a DICOM MR series against a CT plugin
    warnings = modality_warnings([ct_plugin], "MR", "DICOM tag (0008,0060)", (-1000.0, 500.0))
    assert len(warnings) == 1 and "meant for CT" in warnings[0] and "MRI" in warnings[0]
    assert modality_warnings([ct_plugin], "CT", "DICOM tag (0008,0060)", (0.0, 500.0)) == []  # the tag wins
    # not stated: the intensities of the demo's own CT fit, those of a real brain MRI (nilearn's MNI152) do not
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_source / "volume.nii.gz")))
    assert modality_warnings([ct_plugin], "", "", (float(ct.min()), float(ct.max()))) == []
    nilearn = pytest.importorskip("nilearn.datasets")
    mri = np.asarray(nilearn.load_mni152_template(resolution=2).get_fdata())
    warnings = modality_warnings([ct_plugin], "", "", (float(mri.min()), float(mri.max())))
    assert len(warnings) == 1 and "probably not a CT" in warnings[0]
    mr_plugin = copy.copy(ct_plugin)
    mr_plugin.modality = "MR"
    assert "like a CT" in modality_warnings([mr_plugin], "", "", (float(ct.min()), float(ct.max())))[0]
    unknown = copy.copy(ct_plugin)
    unknown.modality = ""
    assert modality_warnings([unknown], "MR", "DICOM tag (0008,0060)", (0.0, 1.0)) == []  # nothing to compare


def test_record_plugins_lists_each_plugin_once_and_ensemble_members(results_json):
    record = results_json[0]
    assert record_plugins(record) == [(r["plugin_path"], r["plugin"]) for r in record["results"]]
    ensemble = {"results": [{"plugin": "ensemble", "plugin_path": ["/a.anymc3d", "/b.anymc3d"]},
                            {"plugin": "ensemble", "plugin_path": ["/a.anymc3d", "/b.anymc3d"]}]}
    assert record_plugins(ensemble) == [("/a.anymc3d", "ensemble"), ("/b.anymc3d", "ensemble")]
