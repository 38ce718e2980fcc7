"""Segmenter + CTS model: parity with the reference forward, S = 0, batch invariance, frozen
policy, compile, bf16, checkpoints and clear errors. Small models on the CPU."""
import pytest
import torch
import torch.nn.functional as F
import yaml

import segm
from segm.model import TokenBudgetError, build_net_kwargs, save_model
from segm.model.factory import load_model
from tests.helpers.reference_cts import ref_forward


def tiny_cfg(policy_method="no_sharing", s=0, crop=(64, 96), decoder="mask_transformer", n_cls=5, **kw):
    n = (crop[0] // 16) * (crop[1] // 16)
    return {
        "image_size": crop, "patch_size": 16, "d_model": 64, "n_heads": 2, "n_layers": 2,
        "n_cls": n_cls, "dropout": 0.0, "drop_path_rate": 0.0,
        "decoder": {"name": decoder, "n_layers": 1, "drop_path_rate": 0.0, "dropout": 0.0, "n_cls": n_cls}
        if decoder == "mask_transformer" else {"name": "linear", "n_cls": n_cls},
        "policy_method": policy_method, "policy_schedule": (n - 4 * s, s), **kw,
    }


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return segm.create_segmenter(cfg, policy_ckpt_required=False)


@pytest.mark.parametrize("decoder", ["mask_transformer", "linear"])
def test_cts_forward_matches_reference(decoder):
    model = make(tiny_cfg("policy_net", s=5, decoder=decoder)).eval()
    im = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        out = model.forward_all(im)
        logits_p = model.policy_net(im)["logits"]
        scores = torch.softmax(logits_p, 1)[:, 1].flatten(1)
        ref_logits, ref_code, (m1, m2) = ref_forward(model, im, scores)
    assert out.logits.shape == (3, 5, 64, 96)  # non-square crop
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.layout.policy_code(), ref_code)
    mask1, mask2 = out.policy_indices
    assert torch.equal(mask1, m1) and torch.equal(mask2, m2)
    assert out.policy_logits.shape == (3, 2, 2, 3)


def test_s0_equals_no_sharing_equals_plain_segmenter():
    im = torch.randn(2, 3, 64, 96)
    plain = make(tiny_cfg("no_sharing")).eval()
    s0 = make(tiny_cfg("policy_net", s=0)).eval()
    s0.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        a = plain(im)
        b = s0(im)
        # plain Segmenter: timm ViT features → decoder → reshape → upsample
        feats = plain.encoder.forward_features(im)[:, 1:]
        masks = plain.decoder(feats).transpose(1, 2).reshape(2, 5, 4, 6)
        c = F.interpolate(masks, size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("method", ["policy_net", "no_sharing"])
def test_each_sample_of_a_batch_equals_its_run_alone(method):
    model = make(tiny_cfg(method, s=5 if method != "no_sharing" else 0)).eval()
    im = torch.randn(4, 3, 64, 96)
    with torch.no_grad():
        batched = model(im)
        for i in range(4):
            torch.testing.assert_close(model(im[i : i + 1])[0], batched[i], rtol=1e-5, atol=1e-5)


def test_frozen_policy_gets_no_gradient_and_keeps_bn_stats():
    model = make(tiny_cfg("policy_net", s=5))
    before = {k: v.clone() for k, v in model.policy_net.state_dict().items()}
    model.train()
    assert not model.policy_net.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    im, gt = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    loss = F.cross_entropy(model(im), gt, ignore_index=255)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.policy_net.parameters())
    assert all(not p.requires_grad for p in model.policy_net.parameters())
    after = model.policy_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_folded_policy_follows_loaded_weights():
    """The BN-folded inference copy of the policy is rebuilt when its weights change."""
    a, b = make(tiny_cfg("policy_net", s=5), seed=0).eval(), make(tiny_cfg("policy_net", s=5), seed=1).eval()
    for m in b.policy_net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    im = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a(im)  # builds a's folded copy
        a.load_state_dict(b.state_dict())
        out_a, out_b = a.forward_all(im), b.forward_all(im)
        unfused = b.policy_net(im)["logits"]
    torch.testing.assert_close(out_a.policy_logits, unfused, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_a.logits, out_b.logits)


def test_random_policy_is_seeded_and_per_sample():
    cfg = tiny_cfg("random", s=4, random_seed=3)
    m1, m2 = make(cfg), make(cfg)
    im = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        o1, o2 = m1.forward_all(im), m2.forward_all(im)
    assert torch.equal(o1.layout.shared_idx, o2.layout.shared_idx)
    assert not torch.equal(o1.layout.shared_idx[0], o1.layout.shared_idx[1])


def test_runs_under_bf16_autocast():
    model = make(tiny_cfg("policy_net", s=5)).eval()
    im = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(im)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(im)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_runs_under_torch_compile():
    """Inductor compiles three graphs (the random policy's torch.Generator breaks the forward;
    nothing recompiles). With a cold inductor cache the time is g++ (~15–20 s on a 2-core
    machine: the vector-ISA probes, the precompiled header, one build per kernel); warm, ~3 s.
    Kernels are built in this process (no pool of compile workers to start), and the vector ISA
    is taken from the CPU's flags without a dry-run build per ISA: the same kernels."""
    import torch._inductor.config as inductor_config

    model = make(tiny_cfg("random", s=5, decoder="linear")).eval()
    model.encoder.blocks = model.encoder.blocks[:1]
    im = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model.forward, dynamic=False)
    with torch.no_grad(), inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": True}):
        model.reducer.reset()
        want = model(im)
        model.reducer.reset()
        torch.testing.assert_close(compiled(im), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_runs_under_torch_compile_with_policy_net():
    import torch._inductor.config as inductor_config

    model = make(tiny_cfg("policy_net", s=5)).eval()
    im = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model.forward, dynamic=False)
    with torch.no_grad(), inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": True}):  # as above
        torch.testing.assert_close(compiled(im), model(im), rtol=1e-4, atol=1e-4)


def test_bad_crop_and_input_size_errors():
    with pytest.raises(TokenBudgetError, match="multiple of 32"):
        build_net_kwargs("vit_tiny_patch16_384", "linear", 5, 80, policy_method="random", num_shared=2)
    with pytest.raises(TokenBudgetError, match="U must be N − 4S = 612"):
        build_net_kwargs("vit_small_patch16_384", "mask_transformer", 150, 512,
                         policy_method="policy_net", num_shared=103, num_notshared=611)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_net_kwargs("vit_huge", "linear", 5, 64)
    model = make(tiny_cfg("random", s=2))
    with pytest.raises(ValueError, match="runs only on 64×96 inputs"):
        model(torch.randn(1, 3, 64, 64))


def test_missing_policy_checkpoint_fails_loudly(tmp_path):
    cfg = tiny_cfg("policy_net", s=5, policynet_ckpt=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="policy-network checkpoint not found"):
        segm.create_segmenter(cfg)
    cfg["policynet_ckpt"] = None
    with pytest.raises(ValueError, match="--policynet-ckpt"):
        segm.create_segmenter(cfg)


def test_reference_checkpoint_with_variant_yml_round_trips(tmp_path):
    """A reference-style run folder: checkpoint.pth ({'model': state, ...}) + variant.yml
    whose net_kwargs carry !!python/tuple tags and a policy path that no longer exists."""
    cfg = tiny_cfg("policy_net", s=5, policynet_ckpt="/gone/policynet/model.pth")
    model = make(cfg).eval()
    torch.save({"model": model.state_dict(), "n_cls": 5, "epoch": 3}, tmp_path / "checkpoint.pth")
    variant = {"net_kwargs": cfg, "dataset_kwargs": {"dataset": "ade20k", "normalization": "vit"}}
    text = yaml.dump(variant)  # the reference dumps with the default (unsafe) Dumper
    assert "!!python/tuple" in text
    (tmp_path / "variant.yml").write_text(text)
    loaded, var = load_model(tmp_path / "checkpoint.pth")
    assert var["net_kwargs"]["policy_schedule"] == (4, 5)  # N = 4·6 = 24, U = N − 4S
    im = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(im), model(im))
    # and the project's own format (variant inside the checkpoint) round-trips too
    own = tmp_path / "own"
    own.mkdir()
    save_model(model, variant, own / "model.pth")
    again, _ = load_model(own / "model.pth")
    with torch.no_grad():
        assert torch.equal(again(im), model(im))


def test_checkpoint_without_variant_is_refused(tmp_path):
    model = make(tiny_cfg())
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    with pytest.raises(FileNotFoundError, match="no variant.yml"):
        load_model(tmp_path / "checkpoint.pth")


def test_reference_vit_tiny_key_count():
    net = build_net_kwargs("vit_tiny_patch16_384", "mask_transformer", 150, 64,
                           policy_method="policy_net", num_shared=1)
    model = segm.create_segmenter(net, policy_ckpt_required=False)
    assert len(model.state_dict()) == 475
    assert sum(p.numel() for p in model.policy_net.parameters()) == 2_959_490
    assert model.policy_net.head.weight.shape == (2, 320, 1, 1)


def test_pretrained_pth_is_loaded_with_bilinear_pos_resize(tmp_path):
    from segm.model.vit import create_vit, load_pretrained_vit

    torch.manual_seed(0)
    src = create_vit(48, 16, 64, 2, 2)  # "pretraining" grid 3×3
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    dst = create_vit((64, 96), 16, 64, 2, 2)
    load_pretrained_vit(dst, str(tmp_path / "w.pth"))
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    grid = src.pos_embed[:, 1:].reshape(1, 3, 3, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dst.pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 24, 64))
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst2 = create_vit((64, 96), 16, 64, 2, 2)
    load_pretrained_vit(dst2, str(tmp_path / "w.safetensors"))
    assert torch.equal(dst2.pos_embed, dst.pos_embed)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained_vit(dst2, str(tmp_path / "missing.npz"))


def test_oracle_policy_shares_single_class_superpatches():
    model = make(tiny_cfg("oracle", s=3, oracle_dataset="cityscapes")).eval()
    gt = torch.zeros(2, 64, 96, dtype=torch.long)
    gt[:, :, 64:] = torch.randint(0, 5, (2, 64, 32))  # last superpatch column: mixed
    gt[1, 32:, :32] = 3  # still single-class
    gt[0, 0, 0] = 1  # block 0 of image 0 becomes mixed
    with torch.no_grad():
        out = model.forward_all(torch.randn(2, 3, 64, 96), seg_gt=gt)
    # superpatch grid 2×3; single-class blocks: columns 0 and 1 (x < 64); raster-first ties
    assert out.layout.shared_idx.tolist() == [[1, 3, 4], [0, 1, 3]]
    with pytest.raises(ValueError, match="ground-truth"):
        model(torch.randn(1, 3, 64, 96))


def _to_augreg_npz(vit, path):
    """Writes a timm ViT's weights in the AugReg (JAX) .npz layout that timm's npz loader reads."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = sd["cls_token"].shape[-1]
    heads = vit.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, d)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_pretrained_augreg_npz_is_loaded_with_bilinear_pos_resize(tmp_path):
    from segm.model.vit import create_vit, load_pretrained_vit

    torch.manual_seed(0)
    src = create_vit(48, 16, 64, 2, 2)  # "pretraining" grid 3×3
    _to_augreg_npz(src, tmp_path / "augreg.npz")
    dst = create_vit((64, 96), 16, 64, 2, 2)
    load_pretrained_vit(dst, str(tmp_path / "augreg.npz"))
    want, got = src.state_dict(), dst.state_dict()
    for k in want:
        if k != "pos_embed":
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    grid = src.pos_embed[:, 1:].reshape(1, 3, 3, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dst.pos_embed[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 24, 64))
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])


def test_policy_runs_in_chunks_on_cpu_and_matches_the_whole_batch(monkeypatch):
    """On the CPU the policy runs on as many images at a time as keep its largest activation
    under glibc's mmap threshold (re-faulting larger blocks on every call dominated its time)."""
    from segm.model.policy import PolicyNet
    from segm.model.policy import fastpath as pn

    policy = PolicyNet().eval()
    assert pn.peak_activation_ratio(policy) == 8.0  # efficientnet_lite0: 96 channels at half size
    im = torch.randn(5, 3, 64, 96)
    monkeypatch.setattr(pn, "CPU_CHUNK_BYTES", 2 * 8 * im[0].numel() * 4)
    sizes = []
    policy.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        got = pn.policy_logits(policy, im)
        chunked, sizes[:] = list(sizes), []
        want = policy(im)["logits"]
    assert chunked == [2, 2, 1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(pn, "CPU_CHUNK_BYTES", 32 << 20)
    sizes.clear()
    with torch.no_grad():
        pn.policy_logits(policy, im)
    assert sizes == [5]  # small images: one call


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_folded_policy_fuses_each_conv_with_its_activation(backbone):
    """The BN-folded inference copy runs oneDNN's fused conv + ReLU6 with pre-packed weights on
    the CPU, and matches the unfolded policy; under autocast it falls back to conv, then act.
    The tf_ variant's 5 stride-2 "same"-padded convs (timm Conv2dSame, asymmetric padding) are
    fused too: padded first, as Conv2dSame does, then run without padding."""
    from segm.model.policy import FoldedConvAct, PolicyNet, fuse_batchnorm

    torch.manual_seed(0)
    policy = PolicyNet(backbone).eval()
    for m in policy.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    fused = fuse_batchnorm(policy).to(memory_format=torch.channels_last)
    convs = [m for m in fused.modules() if isinstance(m, FoldedConvAct)]
    assert len(convs) == 48 and all(not isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    im = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = policy(im)["logits"]
        got = fused(im)["logits"]
        assert all(len(m._packed) == 1 for m in convs)  # the oneDNN path ran
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # a second batch size gets its own packing; both keep matching the unfolded policy
        torch.testing.assert_close(fused(im[:1])["logits"], want[:1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(im)["logits"], want, rtol=1e-4, atol=1e-4)
        assert all(len(m._packed) == 2 for m in convs)
        for m in convs:
            m._packed.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused(im)["logits"]
        assert all(not m._packed for m in convs) and low.dtype == torch.bfloat16


@pytest.mark.parametrize("k, stride, groups", [(3, 2, 8), (5, 2, 8), (3, 2, 1), (3, 1, 8), (5, 1, 1)])
def test_folded_same_conv_matches_timm_conv2d_same(k, stride, groups):
    """TensorFlow-"same" convs (timm Conv2dSame, the tf_ policy's stride-2 convs) run on oneDNN
    with a zero tap where the padding is one larger at the end: the same values as padding the
    input, on even and odd sizes (odd totals pad asymmetrically, even ones do not)."""
    from timm.layers import Conv2dSame

    from segm.model.policy import FoldedConvAct

    torch.manual_seed(0)
    conv = Conv2dSame(8, 16 if groups == 1 else 8, k, stride=stride, groups=groups).eval()
    layer = FoldedConvAct(conv, torch.nn.ReLU6())
    with torch.no_grad():
        for h, w in [(16, 16), (15, 17), (32, 9)]:
            x = torch.randn(2, 8, h, w).contiguous(memory_format=torch.channels_last)
            want = torch.nn.functional.relu6(conv(x))
            got = layer(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(layer._packed) == 3  # the oneDNN path ran for each shape


def test_folded_conv_packs_its_weight_for_the_input_shape(monkeypatch):
    """oneDNN chooses the packed weight layout for the input shape it is told; packed without
    one, the 1152-channel 1×1 convs of efficientnet_lite0 ran 12× slower (BENCHMARKS.md). Each
    packing is told the shape it serves, once per shape, and redone when the weight changes."""
    from segm.model.policy import fastpath as pf

    calls = []
    real = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight",
                        lambda *a: calls.append(a[5] if len(a) > 5 else None) or real(*a))
    layer = pf.FoldedConvAct(torch.nn.Conv2d(64, 32, 1), torch.nn.ReLU6()).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for batch in (x, x, x[:1], x):
            want = torch.nn.functional.relu6(layer.conv(batch))
            torch.testing.assert_close(layer(batch), want, rtol=1e-5, atol=1e-5)
        assert calls == [[2, 64, 8, 8], [1, 64, 8, 8]]
        layer.conv.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), torch.nn.functional.relu6(layer.conv(x)), rtol=1e-5, atol=1e-5)
    assert calls[-1] == [2, 64, 8, 8] and len(calls) == 3
