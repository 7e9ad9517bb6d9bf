"""PlaneCycle: the operator and the timm converter against independent computations, on load-bearing
backbones of both families and non-cubic volumes (D != h != w), so that plane, axis and pooling mistakes show.

The independent computations are timm's own 2D ``forward_features`` per slice, and a reference written here
with explicit per-sequence loops over voxel indices and adaptive average pooling by its definition (window
[floor(i*n/m), ceil((i+1)*n/m))), sharing no code with ``anymc3d.planecycle``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import SimpleITK as sitk
import timm
import torch
import torch.nn.functional as F
from anymc3d import cli
from anymc3d.backbone import make_load_bearing, save_backbone
from anymc3d.planecycle import converter, features, op
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.converter import PlaneCycleEncoder, lift
from anymc3d.image_reading import read_image
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import make_ct_volume, random_oblique_direction
from conftest import small_backbone

D, h, w = 5, 4, 6  # non-cubic token volume: pooling 5->4, 4->5, 5->6, 6->5 all non-trivial


def _volume(family: str, seed: int = 0, depth: int = D) -> torch.Tensor:
    patch = 14 if family == "dinov2" else 16
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, depth, 3, h * patch, w * patch, generator=g)  # (1, D, 3, H, W)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# Independent reference (explicit loops, pooling by definition)
# ------------------------------------------------------------------------------------------------


def _ref_pool(rows: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Adaptive average pooling by definition: output i averages inputs floor(i*n/size) .. ceil((i+1)*n/size)-1."""
    n = len(rows)
    return [torch.stack(rows[(i * n) // size: -((-(i + 1) * n) // size)]).mean(0) for i in range(size)]


def _ref_sequences(plane: str, depth: int, height: int, width: int):
    """Per plane: the voxel indices (z, y, x) of every sequence, row-major, and the sequence grid."""
    if plane == "HW":
        return [[(p, y, x) for y in range(height) for x in range(width)] for p in range(depth)], (height, width)
    if plane == "DW":
        return [[(z, p, x) for z in range(depth) for x in range(width)] for p in range(height)], (depth, width)
    assert plane == "DH"
    return [[(z, y, p) for z in range(depth) for y in range(height)] for p in range(width)], (depth, height)


def _ref_block(model, blk, patches, glob, plane, variant):
    """One lifted block on one volume. patches (D, h, w, C), glob (D, G, C) -> the same shapes."""
    depth, height, width, _ = patches.shape
    g = glob.shape[1]
    sequences, grid = _ref_sequences(plane, depth, height, width)
    slices = [glob[z] for z in range(depth)]
    if variant == "pcg":
        entering = _ref_pool(slices, len(sequences))
    else:
        entering = [sum(slices) / depth] * len(sequences)
    kwargs = {"rope": model.rope.get_embed(shape=[grid[0], grid[1]])} if getattr(model, "rope", None) is not None else {}
    out = torch.empty_like(patches)
    leaving = []
    for p, voxels in enumerate(sequences):
        seq = torch.stack([patches[v] for v in voxels])  # (L, C)
        res = blk(torch.cat([entering[p], seq])[None], **kwargs)[0]  # one sequence at a time
        leaving.append(res[:g])
        for n, v in enumerate(voxels):
            out[v] = res[g + n]
    return out, torch.stack(_ref_pool(leaving, depth))


def _ref_stem(model, volume):
    """timm's own stem output: the input of block 0 in ``forward_features``, for each slice (D, N, C)."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        model.forward_features(volume)
    finally:
        handle.remove()
    return seen[0]


def _ref_lifted(model, volume, planes, variant="pcg"):
    """Reference lifted forward of one (D, 3, H, W) volume on an explicit list of planes, one per block."""
    tokens = _ref_stem(model, volume)  # (D, G + h*w, C)
    g = model.num_prefix_tokens
    height, width = model.patch_embed.dynamic_feat_size(volume.shape[-2:])
    glob = tokens[:, :g]
    patches = tokens[:, g:].reshape(volume.shape[0], height, width, -1)
    for blk, plane in zip(model.blocks, planes, strict=True):
        patches, glob = _ref_block(model, blk, patches, glob, plane, variant)
    return model.norm(patches), model.norm(glob)


def _lifted_error(model, volume, variant="pcg") -> float:
    """Relative error of the converter against the reference, default cycle on a 3-block model: HW, DW, DH."""
    with torch.no_grad():
        ref_patches, ref_glob = _ref_lifted(model, volume[0], ["HW", "DW", "DH"], variant)
        feats = lift(model, PlaneCycleConfig(variant=variant)).forward_features(volume)
    return max(_rel(feats.patch_tokens[0], ref_patches), _rel(feats.global_tokens[0], ref_glob))


# ------------------------------------------------------------------------------------------------
# Operator and converter against the independent computations
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_all_hw_pcg_equals_timm_slicewise(family):
    """All-HW PCg is the 2D model on every slice: against timm's own forward_features (and its intermediates)."""
    model = small_backbone(family).model
    volume = _volume(family)
    feats = lift(model, PlaneCycleConfig(cycle=("HW",))).forward_features(volume, layers=[1])
    g = model.num_prefix_tokens
    timm_tokens = model.forward_features(volume[0])  # (D, G + h*w, C), timm's 2D forward per slice
    assert _rel(feats.patch_tokens[0].reshape(D, h * w, -1), timm_tokens[:, g:]) <= 1e-5
    assert _rel(feats.global_tokens[0], timm_tokens[:, :g]) <= 1e-5
    _, taken = model.forward_intermediates(volume[0], indices=[1], norm=True, output_fmt="NLC",
                                           return_prefix_tokens=True)
    assert _rel(feats.layers[1][0][0].reshape(D, h * w, -1), taken[0][0]) <= 1e-5
    assert _rel(feats.layers[1][1][0], taken[0][1]) <= 1e-5


@torch.no_grad()
def test_all_hw_pcm_differs_from_slicewise(family):
    """PCm replaces the global tokens by their mean on HW blocks too, so all-HW PCm is not the 2D model."""
    model = small_backbone(family).model
    volume = _volume(family)
    pcm = lift(model, PlaneCycleConfig(variant="pcm", cycle=("HW",))).forward_features(volume)
    timm_tokens = model.forward_features(volume[0])
    assert _rel(pcm.patch_tokens[0].reshape(D, h * w, -1), timm_tokens[:, model.num_prefix_tokens:]) > 1e-3


@pytest.mark.parametrize("variant", ["pcg", "pcm"])
@pytest.mark.parametrize("plane", ["DW", "DH"])
@torch.no_grad()
def test_one_dw_and_one_dh_block_equal_the_reference(family, plane, variant):
    """The pure operator on one DW / DH block equals the explicit per-sequence reference (with per-plane RoPE)."""
    model = small_backbone(family).model
    g_, c = model.num_prefix_tokens, model.embed_dim
    gen = torch.Generator().manual_seed(1)
    patches, glob = torch.randn(1, D, h, w, c, generator=gen), torch.randn(1, D, g_, c, generator=gen)
    blk = model.blocks[1]
    rope = None if family == "dinov2" else (lambda grid: model.rope.get_embed(shape=list(grid)))
    got_p, got_g = op.plane_cycle(patches, glob, blk, plane, variant, rope)
    ref_p, ref_g = _ref_block(model, blk, patches[0], glob[0], plane, variant)
    assert got_p.shape == patches.shape and got_g.shape == glob.shape
    assert _rel(got_p[0], ref_p) <= 1e-5
    assert _rel(got_g[0], ref_g) <= 1e-5
    assert _rel(got_p[0], patches[0]) > 1e-2  # the block is load-bearing: the comparison is not trivial


@pytest.mark.parametrize("variant", ["pcg", "pcm"])
def test_lifted_model_equals_the_reference(family, variant):
    """The converter (stem, schedule HW DW DH, per-plane RoPE, pooling through D, final norm) = the reference."""
    model = small_backbone(family).model
    assert _lifted_error(model, _volume(family), variant) <= 1e-5


def test_pool_slices_is_adaptive_average_pooling_by_definition():
    x = torch.randn(2, 5, 3, 7)
    for size in (4, 5, 6, 1, 11):
        ref = torch.stack(_ref_pool(list(x.unbind(1)), size), dim=1)
        assert torch.allclose(op.pool_slices(x, size), ref, atol=1e-6), size


def test_plane_schedule_cycles():
    cycle = PlaneCycleConfig().cycle
    assert [op.plane_at(cycle, i) for i in range(12)] == ["HW", "DW", "DH", "HW", "HW", "DW", "DH", "HW", "HW", "DW", "DH", "HW"]
    with pytest.raises(ValueError, match="cycle"):
        PlaneCycleConfig(cycle=("HW", "XY"))
    with pytest.raises(ValueError, match="variant"):
        PlaneCycleConfig(variant="mean")


# ------------------------------------------------------------------------------------------------
# The likely mistakes, each made on purpose: the reference comparison above must fail for each
# ------------------------------------------------------------------------------------------------


def test_catches_dw_and_dh_swapped(family, monkeypatch):
    model, volume = small_backbone(family).model, _volume(family)
    monkeypatch.setattr(op, "NORMAL_AXIS", {"HW": 1, "DW": 3, "DH": 2})
    assert _lifted_error(model, volume) > 1e-3


def test_catches_transposed_rope_grid(monkeypatch):
    model, volume = small_backbone("dinov3").model, _volume("dinov3")
    rope = model.rope
    monkeypatch.setattr(PlaneCycleEncoder, "_rope", lambda self: (lambda grid: rope.get_embed(shape=[grid[1], grid[0]])))
    assert _lifted_error(model, volume) > 1e-3


def test_catches_pooling_from_plane_to_plane(family, monkeypatch):
    """Global tokens pooled straight from one plane's P to the next plane's P instead of through D."""
    state = {}

    def plane_to_plane(patches, glob, block, plane, variant="pcg", rope=None):
        b, d, _, _, c = patches.shape
        axis = op.NORMAL_AXIS[plane]
        p = patches.shape[axis]
        planes = patches.movedim(axis, 1)
        grid = tuple(planes.shape[2:4])
        source = state.get("prev", glob)
        tokens = torch.cat([op.pool_slices(source, p).reshape(b * p, -1, c), planes.reshape(b * p, -1, c)], dim=1)
        out = block(tokens) if rope is None else block(tokens, rope=rope(grid))
        g = glob.shape[2]
        state["prev"] = out[:, :g].reshape(b, p, g, c)
        return out[:, g:].reshape(b, p, *grid, c).movedim(1, axis), op.pool_slices(state["prev"], d)

    model, volume = small_backbone(family).model, _volume(family)
    monkeypatch.setattr(converter, "plane_cycle", plane_to_plane)
    assert _lifted_error(model, volume) > 1e-3


def test_catches_interpolation_instead_of_adaptive_pooling(family, monkeypatch):
    def interpolate(tokens, size):
        b, n, g, c = tokens.shape
        if n == size:
            return tokens
        rows = tokens.permute(0, 2, 3, 1).reshape(b * g * c, 1, n)
        return F.interpolate(rows, size=size, mode="linear", align_corners=False).reshape(b, g, c, size).permute(0, 3, 1, 2)

    model, volume = small_backbone(family).model, _volume(family)
    monkeypatch.setattr(op, "pool_slices", interpolate)
    assert _lifted_error(model, volume) > 1e-3


# ------------------------------------------------------------------------------------------------
# No new parameters, no edits, restore
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_exactly_the_backbones_parameters_and_restore(family):
    model = small_backbone(family).model
    x = _volume(family)[0]
    before = model.forward_features(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    encoder = lift(model)
    encoder.forward_features(_volume(family, seed=3))
    assert [id(p) for p in encoder.parameters()] == [id(p) for p in model.parameters()]
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in model.parameters())
    assert [id(b) for b in encoder.buffers()] == [id(b) for b in model.buffers()]
    restored = encoder.restore()
    assert restored is model
    assert [n for n, _ in restored.named_modules()] == names
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in restored.modules())
    assert all(torch.equal(v, state[k]) for k, v in restored.state_dict().items())
    assert torch.equal(restored.forward_features(x), before)  # bit-identical plain 2D outputs


def test_refuses_other_models():
    with pytest.raises(TypeError, match="model"):
        PlaneCycleEncoder(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# features CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbones")
    out = {}
    for fam in ("dinov2", "dinov3"):
        loaded = small_backbone(fam)
        out[fam] = (save_backbone(loaded.model, loaded.spec, folder / f"{fam}.safetensors"), loaded.model)
    return out


def _load(folder, name):
    array = np.load(folder / f"{name}.npy")
    assert array.dtype == np.float32
    return torch.from_numpy(array)


@pytest.mark.parametrize("mode", ["planecycle", "slicewise"])
def test_features_cli_on_npy(backbone_files, family, mode, tmp_path):
    path, model = backbone_files[family]
    volume = _volume(family)
    np.save(tmp_path / "vol.npy", volume[0].numpy())
    out = tmp_path / "out"
    rc = cli.main(["features", str(tmp_path / "vol.npy"), "--backbone", str(path), "--mode", mode,
                   "--variant", "pcm", "--cycle", "HW,DH", "--layers", "0,2", "--out", str(out)])
    assert rc == 0
    g = model.num_prefix_tokens
    patches, glob = _load(out, "patch_tokens"), _load(out, "global_tokens")
    assert patches.shape == (D, h, w, model.embed_dim) and glob.shape == (D, g, model.embed_dim)
    with torch.no_grad():
        if mode == "planecycle":
            ref = lift(model, PlaneCycleConfig(variant="pcm", cycle=("HW", "DH"))).forward_features(volume, layers=[0, 2])
            ref_p, ref_g, ref_layer = ref.patch_tokens[0], ref.global_tokens[0], ref.layers[0]
        else:
            tokens = model.forward_features(volume[0])  # timm's own
            ref_p, ref_g = tokens[:, g:].reshape(D, h, w, -1), tokens[:, :g]
            _, taken = model.forward_intermediates(volume[0], indices=[0], norm=True, output_fmt="NLC",
                                                   return_prefix_tokens=True)
            ref_layer = (taken[0][0].reshape(1, D, h, w, -1), taken[0][1][None])
    assert _rel(patches, ref_p) <= 1e-5 and _rel(glob, ref_g) <= 1e-5
    assert _rel(_load(out, "layer0_patch_tokens"), ref_layer[0][0]) <= 1e-5
    assert _rel(_load(out, "layer0_global_tokens"), ref_layer[1][0]) <= 1e-5
    assert _load(out, "layer2_patch_tokens").shape == patches.shape
    assert torch.allclose(_load(out, "volume_embedding"), glob[:, 0].mean(0), atol=1e-6)
    meta = json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert meta["mode"] == mode and meta["layers"] == [0, 2]


def test_features_cli_on_image(backbone_files, tmp_path):
    path, model = backbone_files["dinov3"]
    image = make_ct_volume(size=(40, 36, 6), spacing=(0.8, 0.9, 3.0), lesion=True)
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    out = tmp_path / "out"
    rc = cli.main(["features", str(tmp_path / "case.nii.gz"), "--backbone", str(path), "--mode", "planecycle",
                   "--input-size", "64", "--out", str(out)])
    assert rc == 0
    slices, _ = prepare(read_image(tmp_path / "case.nii.gz"), PreprocessConfig(input_size=64))
    assert slices.shape[0] == 6  # slice axis = largest spacing
    with torch.no_grad():
        ref = lift(model).forward_features(to_model_input(slices)[None])
    patches = _load(out, "patch_tokens")
    assert patches.shape == (6, 4, 4, model.embed_dim)
    assert _rel(patches, ref.patch_tokens[0]) <= 1e-5


def test_features_cli_plain_timm_state_dict_with_arch(tmp_path):
    """WEIGHTS as a plain timm state dict (safetensors), --arch the timm name; the position embedding's size
    is taken from the file, so the model is the saved one exactly."""
    arch = "vit_small_patch14_reg4_dinov2"
    model = make_load_bearing(timm.create_model(arch, pretrained=False, num_classes=0, img_size=56,
                                                dynamic_img_size=True).eval(), seed=2)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    volume = torch.randn(3, 3, 56, 70)
    np.save(tmp_path / "v.npy", volume.numpy())
    rc = cli.main(["features", str(tmp_path / "v.npy"), "--backbone", str(tmp_path / "w.safetensors"),
                   "--arch", arch, "--mode", "slicewise", "--out", str(tmp_path / "o")])
    assert rc == 0
    with torch.no_grad():
        ref = model.forward_features(volume)[:, 5:].reshape(3, 4, 5, -1)
    assert _rel(_load(tmp_path / "o", "patch_tokens"), ref) <= 1e-5


def test_features_cli_bad_input_is_one_line_and_writes_nothing(backbone_files, tmp_path, caplog):
    path, _ = backbone_files["dinov2"]
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 28, 28), dtype=np.float64))
    rc = cli.main(["features", str(tmp_path / "bad.npy"), "--backbone", str(path), "--mode", "slicewise",
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    assert any("bad.npy" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "o").exists()
    rc = cli.main(["features", str(tmp_path / "bad.npy"), "--backbone", str(tmp_path / "none.safetensors"),
                   "--mode", "slicewise", "--out", str(tmp_path / "o")])
    assert rc == 2


def test_write_features_leaves_nothing_on_failure(monkeypatch, tmp_path):
    feats = converter.VolumeFeatures(torch.zeros(1, 2, 2, 2, 4), torch.zeros(1, 2, 1, 4), {0: (torch.zeros(1, 2, 2, 2, 4), torch.zeros(1, 2, 1, 4))})
    calls = []
    real = np.save

    def failing(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(features.np, "save", failing)
    with pytest.raises(OSError):
        features.write_features(feats, tmp_path, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Seed-point similarity
# ------------------------------------------------------------------------------------------------


def _oblique_image(seed=0):
    image = make_ct_volume(size=(22, 18, 7), spacing=(0.9, 0.8, 2.5), lesion=True,
                           direction=random_oblique_direction(seed))
    return image


def test_seed_to_slice_inverts_to_input():
    """seed_to_slice against to_input itself: map slice-space coordinate volumes onto the input grid and read
    them at the seed voxel (numpy index [k, j, i]); for oblique, flipped and reoriented geometries."""
    for seed, axis in ((0, "auto"), (1, 0), (2, 1)):
        image = _oblique_image(seed)
        _, geometry = prepare(image, PreprocessConfig(input_size=8, slice_axis=axis))
        coords = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in geometry.slice_shape], indexing="ij")
        mapped = [sitk.GetArrayFromImage(geometry.to_input(c)) for c in coords]  # 3 x (K, J, I)
        rng = np.random.default_rng(seed)
        for _ in range(20):
            ijk = [int(rng.integers(n)) for n in geometry.size]
            expected = tuple(int(m[ijk[2], ijk[1], ijk[0]]) for m in mapped)
            assert features.seed_to_slice(geometry, ijk) == expected


def test_similarity_map_geometry_and_values(backbone_files, tmp_path):
    path, model = backbone_files["dinov3"]
    image = _oblique_image()
    sitk.WriteImage(image, str(tmp_path / "case.nrrd"))
    seed = (5, 11, 3)
    out = tmp_path / "sim.nii.gz"
    rc = cli.main(["similarity", str(tmp_path / "case.nrrd"), "--seed", ",".join(map(str, seed)),
                   "--backbone", str(path), "--input-size", "64", "--out", str(out)])
    assert rc == 0
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize()
    assert np.allclose(result.GetOrigin(), image.GetOrigin()) and np.allclose(result.GetSpacing(), image.GetSpacing())
    assert np.allclose(result.GetDirection(), image.GetDirection())
    # independent: features, the seed's token from the slice-space index, cosine, to_input
    slices, geometry = prepare(read_image(tmp_path / "case.nrrd"), PreprocessConfig(input_size=64))
    with torch.no_grad():
        tokens = lift(model).forward_features(to_model_input(slices)[None]).patch_tokens[0]  # (D, h, w, C)
    s, y, x = features.seed_to_slice(geometry, seed)
    full = geometry.slice_shape
    token = (s * tokens.shape[0] // full[0], y * tokens.shape[1] // full[1], x * tokens.shape[2] // full[2])
    cosine = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(tokens[token], dim=0)
    expected = sitk.GetArrayFromImage(geometry.to_input(cosine))
    assert np.allclose(sitk.GetArrayFromImage(result), expected, atol=1e-5)
    assert float(cosine[token]) == pytest.approx(1.0, abs=1e-5)
    assert float(cosine.min()) < 0.99  # not a constant map


def test_similarity_seed_outside_the_image(backbone_files, tmp_path, caplog):
    path, _ = backbone_files["dinov3"]
    sitk.WriteImage(_oblique_image(), str(tmp_path / "case.nrrd"))
    rc = cli.main(["similarity", str(tmp_path / "case.nrrd"), "--seed", "22,0,0", "--backbone", str(path),
                   "--input-size", "64", "--out", str(tmp_path / "s.nii.gz")])
    assert rc == 2
    assert any("outside the image" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "s.nii.gz").exists()


# ------------------------------------------------------------------------------------------------
# The lifted encoder as an encoder kind of the model module
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_lifted_encoder_kind_in_the_model(family):
    """Kind 'planecycle': slice embeddings are the lifted per-slice CLS tokens; a padded batch gives each volume
    its own unpadded result (padding never enters the lifted forward), and the result is not the 2D one."""
    from anymc3d import encoders
    from anymc3d.model import AnyMC3DModel
    from anymc3d.planecycle import encoder
    from anymc3d.plugin import TaskHead

    assert encoders.ENCODERS["planecycle"] is encoder.LiftedEncoder
    bb = small_backbone(family)
    size = bb.spec.img_size
    torch.manual_seed(0)
    head = TaskHead(bb.model.embed_dim, 2)
    model = AnyMC3DModel(bb.model, head, [None], kind="planecycle", cycle=("HW", "DW", "DH"))
    cases = [torch.rand(5, size, size), torch.rand(3, size, size)]
    padded = torch.zeros(2, 5, size, size)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for i, c in enumerate(cases):
        padded[i, :c.shape[0]], mask[i, :c.shape[0]] = c, True
    out = model([padded], [mask], patch_tokens=True)
    flat = AnyMC3DModel(bb.model, head, [None])([padded], [mask])  # the 2D kind on the same slices
    for i, c in enumerate(cases):
        ref = lift(bb.model, PlaneCycleConfig(cycle=("HW", "DW", "DH"))).forward_features(to_model_input(c)[None])
        n = c.shape[0]
        assert _rel(out.embeddings[0][i, :n], ref.cls_tokens[0]) <= 1e-5
        assert _rel(out.patch_tokens[0][i, :n], ref.patch_tokens[0]) <= 1e-5
        assert torch.all(out.embeddings[0][i, n:] == 0)
        alone = model([c[None]])
        assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-5)
        assert _rel(out.embeddings[0][i, :n], flat.embeddings[0][i, :n]) > 1e-3
    with pytest.raises(ValueError, match="heatmap"):
        model([padded], [mask], heatmap="attention")


@torch.no_grad()
def test_mean_token_head_contributions_are_exact_and_fit_learns():
    """The lifted-feature head: contributions sum to logit - bias exactly (padding gets none), the mean is over real
    slices only, and the sklearn fit separates a task that is linear in the mean token."""
    from anymc3d.planecycle.head import MeanTokenHead

    torch.manual_seed(0)
    head = MeanTokenHead(8, 3)
    tokens = torch.randn(2, 5, 4, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    logits = head(tokens, mask)
    contrib = head.contributions(tokens, mask)  # (B, K, D, h, w)
    assert torch.allclose(contrib.sum(dim=(2, 3, 4)) + head.head.bias, logits, atol=1e-5)
    assert torch.all(contrib[1, :, 3:] == 0)
    manual = tokens[1, :3].reshape(-1, 8).mean(0) @ head.head.weight.T + head.head.bias  # independent mean
    assert torch.allclose(logits[1], manual, atol=1e-5)
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(80, 8))
    labels = (pooled[:, 0] - pooled[:, 1] > 0).astype(int)
    head = MeanTokenHead(8, 1).fit(pooled, labels, c=10.0)
    predicted = (head.head(torch.as_tensor(pooled, dtype=torch.float32))[:, 0] > 0).numpy()
    assert (predicted == labels.astype(bool)).mean() >= 0.95
