"""Lifted-feature plugins (kind ``planecycle_linear``): exact contribution maps, fit-lifted, file format, predict.

Small load-bearing backbones (conftest) and small synthetic CT volumes; everything on CPU in fp32.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from anymc3d import cli
from anymc3d.backbone import save_backbone
from anymc3d.contract import validate_record
from anymc3d.errors import PluginError
from anymc3d.model import AnyMC3DModel
from anymc3d.planecycle.converter import PlaneCycleEncoder
from anymc3d.planecycle.encoder import LiftedLinearEncoder
from anymc3d.plugin import (
    JSON_NAME,
    TaskHead,
    load_plugin,
    read_plugin_metadata,
    save_plugin,
)
from anymc3d.preprocessing import to_model_input
from anymc3d.synthetic import make_ct_volume
from conftest import small_backbone

CYCLE = ("HW", "DW", "DH")
SIZE = (48, 48, 10)        # I, J, K voxels: K (largest spacing) is the slice axis -> D = 10 slices
SPACING = (1.0, 1.0, 3.0)
LEFT, RIGHT = 12.0, 36.0   # lesion centre along I, in the left / right half


def _head(width: int, classes: int, seed: int = 0) -> TaskHead:
    torch.manual_seed(seed)
    head = TaskHead(width, classes)
    with torch.no_grad():
        head.task_pool.query.normal_(0, 1.0)  # a non-uniform a_s: the identity must hold for any query
        head.head.weight.normal_(0, 1.0)
        head.head.bias.normal_(0, 1.0)
    return head


def test_contribution_maps_sum_to_logit_minus_bias_exactly():
    """sum_s a_s sum_t (w_k . p_{s,t}) / (h w) = logit_k - b_k (fp32), on a padded batch of non-cubic volumes
    (D = 7 and 5 slices of a 4 x 4 token grid); h_s is the mean of the lifted patch tokens, checked against the
    converter run on its own."""
    bb = small_backbone("dinov2")
    head = _head(bb.model.embed_dim, 3)
    model = AnyMC3DModel(bb.model, head, [None], kind="planecycle_linear", cycle=CYCLE).eval()
    torch.manual_seed(1)
    views = torch.rand(2, 7, 56, 56)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        out = model([views], [mask], patch_tokens=True)
        signed = LiftedLinearEncoder.signed_maps(head.head.weight, out.patch_tokens[0])  # (K, B, S, P)
        maps = model.finding_maps([views], out, "contribution", [mask])
    assert signed.shape == (3, 2, 7, 16)
    a = out.importance[0]  # (B, S)
    assert a[0].std() > 1e-3, "the query should weigh slices unevenly"
    total = torch.einsum("kbsp,bs->bk", signed.double(), a.double())
    expected = (out.logits - head.head.bias).double()
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-5), (total, expected)
    assert (signed.abs().sum(-1) > 0).any() and signed.min() < 0 < signed.max()  # both signs occur: clamping matters
    assert torch.equal(maps, signed.clamp_min(0))
    assert torch.all(maps[:, 1, 5:] == 0)  # padded slices explain nothing
    # h_s against the converter alone (per volume, unpadded): mean of its last-block patch tokens
    lifted = PlaneCycleEncoder(bb.model, variant="pcg", cycle=CYCLE)
    with torch.no_grad():
        for i, n in ((0, 7), (1, 5)):
            tokens = lifted.forward_features(to_model_input(views[i, :n])[None]).patch_tokens[0]  # (n, h, w, C)
            assert torch.allclose(out.embeddings[0][i, :n], tokens.mean(dim=(1, 2)), atol=1e-5)


def test_two_view_plugin_refuses_contribution():
    bb = small_backbone("dinov2")
    model = AnyMC3DModel(bb.model, TaskHead(bb.model.embed_dim, 1, 2), [None, None], kind="planecycle_linear")
    views = [torch.rand(1, 4, 56, 56), torch.rand(1, 3, 56, 56)]
    with torch.no_grad():
        out = model(views, patch_tokens=True)
    with pytest.raises(ValueError, match="one view only"):
        model.finding_maps(views, out, "contribution")


# ----------------------------------------------------------------------------------------------- fit-lifted
def _case(folder, name, lesion_i, seed):
    rng = np.random.default_rng(seed)
    lesion = lesion_i is not None
    center = (lesion_i + rng.uniform(-3, 3), 20 + rng.uniform(-4, 4), 5 + rng.uniform(-1.5, 1.5)) if lesion else None
    image = make_ct_volume(size=SIZE, spacing=SPACING, lesion=lesion, lesion_center=center, lesion_radius_mm=6.0,
                           seed=seed)
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _manifest(folder, rows, name="manifest.csv"):
    path = folder / name
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "lesion", "split"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A synthetic task (bright ellipsoid present / absent, left or right half) fitted with ``fit-lifted``, and the
    same cases with shuffled train labels."""
    folder = tmp_path_factory.mktemp("lifted")
    bb = small_backbone("dinov2", seed=3)
    backbone = save_backbone(bb.model, bb.spec, folder / "backbone.safetensors")
    rows, counts = [], {"train": 40, "val": 16, "test": 24}
    seed = 0
    for split, n in counts.items():
        for i in range(n):
            label = i % 2
            side = (LEFT, RIGHT)[(i // 2) % 2]
            path = _case(folder, f"{split}{i:02d}", side if label else None, seed)
            rows.append([path.name, label, split])
            seed += 1
    manifest = _manifest(folder, rows)
    # control: labels independent of the lesion by construction, on every split (in each split and true class,
    # half the cases labelled 1 at random); the control model is scored against its own held-out labels. (A plain
    # permutation of the train labels is not enough: with a feature this strong, their chance correlation with the
    # lesion, ~ +-0.16 for 40 cases, is learnt as a perfect (anti-)classifier of the lesion.)
    rng = np.random.default_rng(0)
    control = []
    for split in counts:
        part = [r for r in rows if r[2] == split]
        labels = np.zeros(len(part), dtype=int)
        for truth in (0, 1):
            where = np.flatnonzero([r[1] == truth for r in part])
            labels[rng.permutation(where)[: len(where) // 2]] = 1
        control += [[r[0], int(y), split] for r, y in zip(part, labels)]
    shuffled = _manifest(folder, control, "shuffled.csv")
    results = {}
    for key, csv_path in (("real", manifest), ("shuffled", shuffled)):
        out = folder / f"{key}.anymc3d"
        rc = cli.main(["fit-lifted", str(csv_path), "--backbone", str(backbone), "--out", str(out),
                       "--cycle", ",".join(CYCLE), "--variant", "pcg", "--log-level", "WARNING"])
        assert rc == 0
        results[key] = out
    return {"folder": folder, "backbone": backbone, **results}


def _auroc(plugin, backbone, folder, split, manifest="manifest.csv"):
    """Held-out AUROC recomputed from the engine's probabilities (not from fit-lifted's own report)."""
    from anymc3d.engine import Engine
    from sklearn.metrics import roc_auc_score

    engine = Engine(backbone, device="cpu")
    name = engine.add_plugin(plugin)
    scores, labels = [], []
    with open(folder / manifest) as fh:
        for row in csv.DictReader(fh):
            if row["split"] == split:
                pred = engine.predict_file(folder / row["image"], [name]).predictions[0]
                scores.append(float(pred.probabilities[0]))
                labels.append(int(row["lesion"]))
    return roc_auc_score(labels, scores)


def test_fit_lifted_separates_the_synthetic_task_and_random_labels_do_not(fitted):
    real = _auroc(fitted["real"], fitted["backbone"], fitted["folder"], "test")
    control = _auroc(fitted["shuffled"], fitted["backbone"], fitted["folder"], "test", "shuffled.csv")
    logging.getLogger(__name__).warning("held-out AUROC: real labels %.3f, lesion-independent labels %.3f", real, control)
    print(f"held-out AUROC (24 cases): real labels {real:.3f}, lesion-independent labels {control:.3f}")
    assert real >= 0.9
    assert 0.25 <= control <= 0.75


def test_a_separated_validation_split_gives_a_finite_platt_slope(fitted):
    """fit-lifted calibrates as training does (anymc3d.calibration): on a perfectly separated validation split the
    slope is the maximum-likelihood fit to Platt's regularised targets (recomputed here with scipy) and finite,
    where the 0/1 labels' likelihood has no finite maximum."""
    from anymc3d.engine import Engine
    from anymc3d.plugin import read_plugin_metadata
    from scipy.optimize import minimize_scalar
    from scipy.special import log_expit

    engine = Engine(fitted["backbone"], device="cpu")
    name = engine.add_plugin(fitted["real"])
    z, y = [], []
    with open(fitted["folder"] / "manifest.csv") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "val":
                z.append(float(engine.predict_file(fitted["folder"] / row["image"], [name]).predictions[0].logits[0]))
                y.append(int(row["lesion"]))
    z, y = np.array(z), np.array(y)
    assert z[y == 1].min() > z[y == 0].max()  # perfectly separated
    meta = read_plugin_metadata(fitted["real"])
    a, b = meta["calibration_a"][0], meta["calibration_b"][0]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = z + b / a  # z - z*, where sigmoid(a z + b) = 0.5

    def nll(slope):
        return -float(np.sum(t * log_expit(slope * x) + (1 - t) * log_expit(-slope * x)))

    def nll_zero_one(slope):  # the former fit's targets, the 0/1 labels
        return -float(np.sum(y * log_expit(slope * x) + (1 - y) * log_expit(-slope * x)))

    expected = minimize_scalar(nll, bounds=(1e-6, 1e4), method="bounded", options={"xatol": 1e-9}).x
    assert np.isfinite(a) and abs(a - expected) < 1e-3 * expected and expected < 1e3  # inside the search bounds
    assert nll_zero_one(10 * a) < nll_zero_one(a)  # with 0/1 targets the likelihood keeps rising with the slope


def test_lifted_plugin_round_trips_with_its_encoder_options(fitted, tmp_path):
    loaded = load_plugin(fitted["real"])
    config = loaded.config
    assert config.kind == "planecycle_linear"
    assert config.encoder == {"variant": "pcg", "cycle": list(CYCLE)}
    assert torch.count_nonzero(loaded.head.task_pool.query) == 0  # uniform a_s, as fitted
    b_tensors = [t for view in loaded.lora for k, t in view.items() if "lora_B" in k]
    assert b_tensors and all(torch.count_nonzero(t) == 0 for t in b_tensors)  # zero LoRA: backbone as trained
    assert config.calibration_a != [1.0]  # Platt fitted on the val split
    # save again -> same metadata and tensors
    again = save_plugin(tmp_path / "again.anymc3d", config, loaded.head, loaded.lora)
    assert read_plugin_metadata(again) == read_plugin_metadata(fitted["real"])
    # a plugin.json without "encoder" (older writers) loads, with the kind's defaults
    folder = tmp_path / "old"
    save_plugin(folder, config, loaded.head, loaded.lora)
    meta = json.loads((folder / JSON_NAME).read_text(encoding="utf-8"))
    del meta["encoder"]
    (folder / JSON_NAME).write_text(json.dumps(meta))
    assert load_plugin(folder).config.encoder == {"variant": "pcg", "cycle": ["HW", "DW", "DH", "HW"]}
    # bad options are refused naming the field; a 2D plugin takes none, and writes no "encoder" key
    meta["encoder"] = {"variant": "pcx"}
    (folder / JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(PluginError, match="encoder: variant"):
        load_plugin(folder)
    meta.update(kind="slice_lora", encoder={"variant": "pcg"})
    (folder / JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(PluginError, match="encoder: kind 'slice_lora' takes no options"):
        load_plugin(folder)
    del meta["encoder"]
    (folder / JSON_NAME).write_text(json.dumps(meta))
    assert load_plugin(folder).config.encoder == {}
    assert "encoder" not in json.loads(save_plugin(tmp_path / "flat", load_plugin(folder).config, loaded.head,
                                                   loaded.lora).joinpath(JSON_NAME).read_text(encoding="utf-8"))


def test_info_shows_kind_and_lifting(fitted, capsys):
    assert cli.main(["info", str(fitted["real"])]) == 0
    text = capsys.readouterr().out
    assert "planecycle_linear" in text and "variant pcg" in text and "cycle HW,DW,DH" in text


def _pair(folder, side, seed):
    """The same noisy volume with a lesion at I = ``side`` and without one."""
    center = (side, 20.0, 5.0)
    kw = {"size": SIZE, "spacing": SPACING, "lesion_radius_mm": 6.0, "seed": seed}
    paths = []
    for name, lesion in (("with", True), ("without", False)):
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(make_ct_volume(lesion=lesion, lesion_center=center if lesion else None, **kw), str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_lesion_changes_the_contribution_map_where_it_is(fitted, side):
    """Exact and local: adding the lesion to a volume (same noise) changes sum_s a_s c_{s,t} by exactly the change
    of the logit, and the largest change is in the lesion's token column half and its slices."""
    from anymc3d.engine import Engine
    from anymc3d.image_reading import read_image
    from anymc3d.preprocessing import prepare

    engine = Engine(fitted["backbone"], device="cpu", merge_lora=False)  # the model called directly: adapter layers
    attached = engine.plugins[engine.add_plugin(fitted["real"])]
    model, recipe = attached.model, attached.plugin.config.preprocessing[0]
    assert model.encoder.kind == "planecycle_linear" and model.encoder.config.cycle == CYCLE  # plugin.json's options
    maps, logits = [], []
    for path in _pair(fitted["folder"], side, seed=500 + int(side)):
        slices, _ = prepare(read_image(path), recipe, path)
        with torch.no_grad():
            out = model([slices[None]], patch_tokens=True)
            signed = LiftedLinearEncoder.signed_maps(model.head.head.weight, out.patch_tokens[0])[0, 0]  # (S, P)
        maps.append((signed * out.importance[0][0][:, None]).reshape(len(slices), 4, 4).double())
        logits.append(out.logits[0, 0].double())
    change = maps[0] - maps[1]  # (S, h, w)
    assert torch.allclose(change.sum(), logits[0] - logits[1], atol=1e-5)
    s, y, x = np.unravel_index(int(change.argmax()), tuple(change.shape))
    assert (x < 2) == (side < SIZE[0] / 2), (side, (s, y, x))
    assert abs(s - 5) <= 2  # the lesion is centred on slice 5 of 10


@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_predict_writes_a_contribution_record_and_heatmap_in_the_input_geometry(fitted, tmp_path, side):
    """``anymc3d predict`` (heatmap method auto) on a lifted plugin: valid records, kind and method named, heatmap
    files in each input's geometry. What the map shows: its maximum is not at the lesion (the positive evidence
    w . p of the random test backbone is largest at the body's centre in every case, lesion or not); the lesion
    shows in the difference of the maps with and without it, which peaks in the lesion's half."""
    with_lesion, without = _pair(tmp_path, side, seed=700 + int(side))
    heatmaps, records = tmp_path / "heatmaps", tmp_path / "records.json"
    rc = cli.main(["predict", str(with_lesion), str(without), "--backbone", str(fitted["backbone"]),
                   "--plugin", str(fitted["real"]), "--device", "cpu", "--heatmap", str(heatmaps),
                   "--json", str(records), "--progress", "none"])
    assert rc == 0
    found = json.loads(records.read_text(encoding="utf-8"))
    assert len(found) == 2
    volumes = []
    for record, image in zip(found, (with_lesion, without)):
        validate_record(record)
        result = record["results"][0]
        assert result["kind"] == "planecycle_linear" and result["heatmap_method"] == "contribution"
        heat, source = sitk.ReadImage(result["heatmap"]), sitk.ReadImage(str(image))
        assert heat.GetSize() == source.GetSize() and heat.GetSpacing() == source.GetSpacing()
        assert heat.GetOrigin() == source.GetOrigin() and heat.GetDirection() == source.GetDirection()
        volumes.append(sitk.GetArrayFromImage(heat).astype(np.float64))  # (K, J, I)
        assert volumes[-1].max() == pytest.approx(1.0)
    assert found[0]["results"][0]["probabilities"]["lesion"] > 0.5 > found[1]["results"][0]["probabilities"]["lesion"]
    peak_i = np.unravel_index(np.argmax(volumes[0]), volumes[0].shape)[2]
    print(f"lesion at I={side}: the map's peak is at I={peak_i}")
    change = volumes[0] - volumes[1]
    change_i = np.unravel_index(np.argmax(change), change.shape)[2]
    assert (change_i < SIZE[0] / 2) == (side < SIZE[0] / 2), (side, change_i)


def test_2d_plugin_refuses_contribution_in_one_line(demo_dir, tmp_path, caplog):
    records = tmp_path / "records.json"
    rc = cli.main(["predict", str(demo_dir / "volume.nii.gz"), "--backbone", str(demo_dir / "backbone.safetensors"),
                   "--plugin", str(demo_dir / "plugin.anymc3d"), "--device", "cpu", "--heatmap", str(tmp_path / "h"),
                   "--heatmap-method", "contribution", "--json", str(records), "--progress", "none"])
    assert rc != 0
    (record,) = json.loads(records.read_text(encoding="utf-8"))
    assert record["status"] == "error"
    assert "'contribution'" in record["error"] and "slice_lora" in record["error"] and "\n" not in record["error"]


def test_manifest_errors_name_the_line(tmp_path, caplog):
    """fit-lifted reads the one manifest format (anymc3d.data.load_manifest): every problem named by its line."""
    shutil.copy(_case(tmp_path, "a", None, 0), tmp_path / "b.nii.gz")
    bad = _manifest(tmp_path, [["a.nii.gz", 0, "train"], ["b.nii.gz", 2, "train"], ["missing.nii.gz", 1, "tset"]])

    def fit(manifest):
        return cli.main(["fit-lifted", str(manifest), "--backbone", str(tmp_path / "unused.safetensors"),
                         "--out", str(tmp_path / "out.anymc3d"), "--log-level", "WARNING"])

    assert fit(bad) == 2
    assert "line 3: label lesion must be 0 or 1, got '2'" in caplog.text
    assert f"line 4: image {tmp_path / 'missing.nii.gz'}: file or folder not found" in caplog.text
    assert "line 4: split must be train, val or test, got 'tset'" in caplog.text
    caplog.clear()
    one_class = _manifest(tmp_path, [["a.nii.gz", 0, "train"], ["b.nii.gz", 0, "train"]], "one.csv")
    assert fit(one_class) == 2
    assert "split 'train' (lines 2, 3): label lesion is 0 in every case" in caplog.text
    assert not (tmp_path / "out.anymc3d").exists()