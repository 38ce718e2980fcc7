"""Bit-for-bit parity of the model's outputs across a code change.

    python scripts/logit_parity.py save DIR      # on the code before the change
    python scripts/logit_parity.py compare DIR   # on the code after it, same machine

Builds small seeded Segmenters for every policy (policy_net, content, random, oracle,
no_sharing, S = 0), both decoders, and a reference-format checkpoint (checkpoint.pth +
variant.yml with tuple tags), runs each on fixed inputs and saves (or compares) the logits and
the layouts. It uses only the interfaces that every version keeps (`segm.create_segmenter`,
`segm.load_model`, the model's forward), so the same file runs on both sides of a change.
Results are exact only on one machine: kernels differ between CPU kinds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import segm


def _cfg(method: str, s: int, decoder: str, crop=(64, 96), n_cls=5, **kw) -> dict:
    n = (crop[0] // 16) * (crop[1] // 16)
    dec = {"name": decoder, "n_cls": n_cls}
    if decoder == "mask_transformer":
        dec.update(drop_path_rate=0.0, dropout=0.0, n_layers=2)
    return {
        "image_size": crop, "patch_size": 16, "d_model": 64, "n_heads": 2, "n_layers": 2, "n_cls": n_cls,
        "normalization": "vit", "dropout": 0.0, "drop_path_rate": 0.0, "decoder": dec,
        "policy_method": method, "policy_schedule": (n - 4 * s, s), **kw,
    }


CASES = {
    f"{method}_{decoder}": (method, s, decoder)
    for decoder in ("linear", "mask_transformer")
    for method, s in (("policy_net", 5), ("content", 5), ("random", 5), ("oracle", 5), ("no_sharing", 0))
}
CASES["policy_net_s0_linear"] = ("policy_net", 0, "linear")
CASES["random_s6_mask_transformer"] = ("random", 6, "mask_transformer")


def _inputs():
    g = torch.Generator().manual_seed(1)
    im = torch.randn(3, 3, 64, 96, generator=g)
    im[0, :, :32, :32] = 0.5  # a uniform block, so policies have ties to break
    gt = torch.randint(0, 5, (3, 64, 96), generator=g)
    gt[:, :32] = 2
    gt[1, 40:, 50:] = 255
    return im, gt


def _run(model, im, gt) -> dict:
    model.eval()
    out = {}
    with torch.no_grad():
        res = model.forward_all(im, gt if model.needs_labels else None)
        out["logits"] = res.logits
        m1, m2 = res.policy_indices
        out["mask1"], out["mask2"] = m1, m2
        out["again"] = model(im, gt if model.needs_labels else None)  # the random stream moves on
    return out


def outputs(tmp: Path) -> dict:
    im, gt = _inputs()
    results = {}
    for name, (method, s, decoder) in CASES.items():
        torch.manual_seed(0)
        model = segm.create_segmenter(_cfg(method, s, decoder), policy_ckpt_required=False)
        results[name] = _run(model, im, gt)
    # a reference-format checkpoint: checkpoint.pth with the reference keys + variant.yml
    torch.manual_seed(3)
    cfg = _cfg("policy_net", 5, "mask_transformer", policynet_ckpt="/gone/policynet/model.pth")
    model = segm.create_segmenter(cfg, policy_ckpt_required=False)
    run = tmp / "reference_run"
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "n_cls": 5, "lr_scheduler": {}, "epoch": 3},
               run / "checkpoint.pth")
    (run / "variant.yml").write_text(_REFERENCE_VARIANT)
    loaded, _ = segm.load_model(run / "checkpoint.pth")
    results["reference_checkpoint"] = _run(loaded, im, gt)
    return results


_REFERENCE_VARIANT = """\
net_kwargs:
  image_size: !!python/tuple [64, 96]
  patch_size: 16
  d_model: 64
  n_heads: 2
  n_layers: 2
  n_cls: 5
  normalization: vit
  dropout: 0.0
  drop_path_rate: 0.0
  decoder: {name: mask_transformer, n_cls: 5, drop_path_rate: 0.0, dropout: 0.0, n_layers: 2}
  policy_method: policy_net
  policy_schedule: !!python/tuple [4, 5]
  policynet_ckpt: /gone/policynet/model.pth
"""


def main(argv) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results = outputs(out)
    if argv[0] == "save":
        torch.save(results, out / "logits.pt")
        print(f"saved {len(results)} cases to {out / 'logits.pt'}")
        return 0
    before = torch.load(out / "logits.pt")
    bad = [f"{case}.{k}" for case in before for k in before[case]
           if case not in results or not torch.equal(before[case][k], results[case][k])]
    print(f"{len(before)} cases, {sum(len(v) for v in before.values())} tensors: "
          + ("all bit-identical" if not bad else f"DIFFER: {', '.join(bad)}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
