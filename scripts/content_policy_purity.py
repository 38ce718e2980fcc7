"""Top-S purity of the training-free content scores (segm.model.reduction.content_policy) against random
selection, the oracle and, if given, a trained policy network, on a dataset's validation images.

    python scripts/content_policy_purity.py $DATASET/synthetic \
        [--policy-ckpt .../policynet/synthetic/model.pth --policy-backbone tf_efficientnet_lite0] \
        [--segmenter-ckpt .../checkpoint.pth]   # its patch embedding for embedding_score

Purity = shared superpatches whose policy label is 1 / shared ones whose label is not 255,
summed over the set. Sets: whole images (cropped to a multiple of 32), the 128×128 sliding
windows (stride 128, last one flush with the border) and one centred 128×128 crop per image
(the policy network's validation geometry). Budgets: S = 25 % of the superpatches (the demo's
S = 4 per 128 window) and the paper's token reduction ρ = 0.3 (S = round(0.3·N/3)).
"""
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from segm.data.policy_labels import policy_labels, rules_for
from segm.model import content_policy as cp
from segm.model.reduction.cts import select_shared
from segm.utils.checkpoint import safe_torch_load
from segm.utils.cli import CONTEXT_SETTINGS

BUDGETS = {"S=25%": lambda n2: round(0.25 * n2), "ρ=0.3": lambda n2: round(0.3 * 4 * n2 / 3)}


def load_val(root: Path):
    out = []
    for p in sorted((root / "images/validation").glob("*.jpg")):
        im = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        lab = np.asarray(Image.open(root / "annotations/validation" / f"{p.stem}.png"), dtype=np.int64)
        h, w = (im.shape[0] // 32) * 32, (im.shape[1] // 32) * 32
        x = (torch.from_numpy(im[:h, :w]).permute(2, 0, 1) / 255 - 0.5) / 0.5  # `vit` normalisation
        out.append((x, torch.from_numpy(lab[:h, :w])))
    return out


def windows(x, lab, ws=128):
    h, w = x.shape[-2:]
    ys = sorted({*range(0, h - ws + 1, ws), h - ws})
    xs = sorted({*range(0, w - ws + 1, ws), w - ws})
    return [(x[:, y:y + ws, c:c + ws], lab[y:y + ws, c:c + ws]) for y in ys for c in xs]


def centre(x, lab, ws=128):
    y, c = (x.shape[1] - ws) // 2, (x.shape[2] - ws) // 2
    return x[:, y:y + ws, c:c + ws], lab[y:y + ws, c:c + ws]


def scorers(policy_ckpt, policy_backbone, segmenter_ckpt):
    s = {
        "colour_spread": cp.colour_spread_score,
        "colour_spread pool4": lambda x: cp.colour_spread_score(x, 4),
        "colour_spread pool8": lambda x: cp.colour_spread_score(x, 8),
        "gradient": cp.gradient_score,
        "gradient pool4": lambda x: cp.gradient_score(x, 4),
    }
    import timm

    torch.manual_seed(0)
    proj = timm.create_model("vit_tiny_patch16_384", pretrained=False).patch_embed.proj
    embeddings = {"random init": (proj.weight.detach(), proj.bias.detach())}
    if segmenter_ckpt:
        m = safe_torch_load(segmenter_ckpt)["model"]
        embeddings["segmenter"] = (m["encoder.patch_embed.proj.weight"], m["encoder.patch_embed.proj.bias"])
    for tag, (w, b) in embeddings.items():
        for metric in ("variance", "cosine"):
            s[f"embedding {metric} ({tag})"] = lambda x, w=w, b=b, m=metric: cp.embedding_score(x, w, b, m)
    if policy_ckpt:
        from segm.model.policy import PolicyNet, load_policy_checkpoint

        net = PolicyNet(policy_backbone)
        load_policy_checkpoint(net, policy_ckpt)
        net.eval()

        @torch.no_grad()
        def policy(x):
            return torch.softmax(net(x)["logits"].float(), 1)[:, 1].flatten(1)

        s[f"policy net ({policy_backbone})"] = policy
    return s


def purity(items, score, budget, labels):
    good = valid = 0
    for (x, _), pl in zip(items, labels):
        idx = select_shared(score(x[None], pl), budget(pl.shape[1]))
        sel = pl.gather(1, idx)
        good += int((sel == 1).sum())
        valid += int((sel != 255).sum())
    return good / max(valid, 1)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--policy-ckpt", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--policy-backbone", default="tf_efficientnet_lite0", show_default=True)
@click.option("--segmenter-ckpt", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--dataset", default="synthetic", show_default=True, help="policy-label rules")
@click.option("--random-seeds", default=10, show_default=True)
def main(data_root, policy_ckpt, policy_backbone, segmenter_ckpt, dataset, random_seeds):
    torch.set_num_threads(1)
    val = load_val(data_root)
    sets = {"whole": val, "128 win": [w for v in val for w in windows(*v)], "128 centre": [centre(*v) for v in val]}
    labels = {k: [policy_labels(lab[None], rules_for(dataset)).flatten(1) for _, lab in v] for k, v in sets.items()}
    for k, pls in labels.items():
        pl = torch.cat(pls, 1)
        print(f"{k}: {len(pls)} images, {pl.numel()} superpatches, "
              f"label-1 rate {float((pl == 1).sum()) / float((pl != 255).sum()):.3f}")
    content = {k: (lambda x, pl, f=f: f(x)) for k, f in scorers(policy_ckpt, policy_backbone, segmenter_ckpt).items()}
    oracle = {"oracle": lambda x, pl: torch.where(pl == 1, 1.0, torch.where(pl == 255, 0.5, 0.0))}
    cols = [(sn, bn) for sn in sets for bn in BUDGETS]
    print("| score | " + " | ".join(f"{sn} {bn}" for sn, bn in cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, score in {**oracle, **content}.items():
        row = [purity(sets[sn], score, BUDGETS[bn], labels[sn]) for sn, bn in cols]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
    rows = []
    for seed in range(random_seeds):
        g = torch.Generator().manual_seed(seed)
        rand = lambda x, pl: torch.rand(pl.shape, generator=g)  # noqa: E731
        rows.append([purity(sets[sn], rand, BUDGETS[bn], labels[sn]) for sn, bn in cols])
    mean, std = np.mean(rows, 0), np.std(rows, 0)
    print(f"| random ({random_seeds} seeds, mean ± sd) | "
          + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std)) + " |")


if __name__ == "__main__":
    main()
