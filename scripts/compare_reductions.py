"""CTS and ALGM compared on one model, one recipe and one dataset (BENCHMARKS.md, "CTS and ALGM
compared"): the demo's recipe (ViT-Ti/16, 600 iterations, batch 8, seed 0) on the synthetic
data of one style, every model evaluated single-scale, on the CPU, with no network.

    python scripts/compare_reductions.py --style plain|textured [--out compare_out] [--quick]

Rows: no reduction; no reduction at a lower resolution (112-px crops of images resized to 224:
49 tokens, about CTS's); CTS with the learned policy and with the content policy (S = 6: 46 of 64
tokens); ALGM static and reference, trained with it and applied to the no-reduction checkpoint
without retraining; CTS (learned) + ALGM static. Tokens per stage are the static counts, or for
ALGM reference the mean over the validation windows in batches of 4 (one image's windows, as the
evaluation runs them: the batch minimum depends on that batch). Re-running reuses finished steps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import BACKBONE, PY, Demo  # noqa: E402

from segm.utils.cli import CONTEXT_SETTINGS  # noqa: E402

S = 6  # CTS: T = 64 − 18 = 46 tokens (28 % fewer)
LOW_RES = ["--im-size", 224, "--crop-size", 112, "--window-size", 112, "--window-stride", 112]
LEARNED = ["--policy-method", "policy_net", "--num-tokens-shared", S]  # + --policynet-ckpt
CONTENT = ["--policy-method", "content", "--num-tokens-shared", S]
ALGM = ["--reducer", "algm"]
ALGM_REF = ["--reducer", "algm:mode=reference"]
# name → (training options, label)
TRAINED = {
    "none": (["--policy-method", "no_sharing"], "no reduction"),
    "low_res": (["--policy-method", "no_sharing", *LOW_RES], "no reduction, 112-px crops of 224-px images"),
    "cts_learned": (LEARNED, f"CTS, learned policy, S = {S}"),
    "cts_content": (CONTENT, f"CTS, content policy, S = {S}"),
    "algm_static": (ALGM, "ALGM static"),
    "algm_reference": (ALGM_REF, "ALGM reference"),
    "cts_algm": ([*LEARNED, *ALGM], f"CTS (learned, S = {S}) + ALGM static"),
}
# The no-reduction checkpoint run with another reduction, no retraining: name → (options, label)
RESHARED = {
    "algm_static": (ALGM, "ALGM static"),
    "algm_reference": (ALGM_REF, "ALGM reference"),
    "cts_learned": (LEARNED, f"CTS, learned policy, S = {S}"),
    "cts_content": (CONTENT, f"CTS, content policy, S = {S}"),
    "cts_algm": ([*LEARNED, *ALGM], f"CTS (learned, S = {S}) + ALGM static"),
    "algm_static_prop_attn": (["--reducer", "algm:prop_attn=true"], "ALGM static, proportional attention"),
    "resize": (["--reducer", "resize:size=112"], "the input resized to 112 px (49 tokens)"),
}


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--style", type=click.Choice(["plain", "textured"]), required=True)
@click.option("--out", default="compare_out", type=click.Path(file_okay=False), show_default=True)
@click.option("--quick", is_flag=True, help="A much shorter run (smoke test; figures not meaningful).")
def main(style, out, quick):
    demo = Demo(Path(out).resolve() / style, quick)
    demo.logs.mkdir(parents=True, exist_ok=True)
    n_train, n_val = (40, 12) if quick else (400, 100)
    if not demo.data_root.is_dir():
        demo.run([PY, "-m", "segm.scripts.prepare_synthetic", demo.out / "datasets", "--num-train", n_train,
                  "--num-val", n_val, "--size", 256, "--seed", 0, "--style", style], "prepare.log")
    train_policy(demo)
    rows = []
    for name, (options, label) in TRAINED.items():
        train(demo, name, options)
        rows.append((label, label, evaluate(demo, name, [])))
    for name, (options, label) in RESHARED.items():
        rows.append(("no reduction", label, evaluate(demo, "none", options)))
    table = render(rows, style)
    (demo.out / "table.md").write_text(table + "\n")
    (demo.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(table)


def with_policy(demo: Demo, options: list) -> list:
    return [*options, "--policynet-ckpt", demo.policy] if "policy_net" in options else list(options)


def train_policy(demo: Demo) -> None:
    if demo.policy.is_file():
        return
    iters = 20 if demo.quick else 500
    demo.run([PY, "-m", "policynet.train", "--dataset", "synthetic", "--data-root", demo.data_root,
              "--exp_name", "synthetic", "--logdir", demo.out / "policynet", "--backbone", "tf_efficientnet_lite0",
              "--pretrained", "lite0", "--num_iterations", iters, "--eval_iterations", iters,
              "--batch_size_train", 8, "--num-workers", 2, "--device", "cpu", "--num-shared", S,
              "--lr", "2e-4", "--no-progress"], "policynet.log")


def train(demo: Demo, name: str, options: list) -> None:
    iters = 20 if demo.quick else 600
    demo.run([PY, "-m", "segm.train", "--log-dir", demo.ckpt(name).parent, "--dataset", "synthetic",
              "--data-root", demo.data_root, "--backbone", BACKBONE, "--pretrained", "none",
              "--decoder", "mask_transformer", "--iterations", iters, "--batch-size", 8,
              "-lr", "1e-3", "--eval-freq", 0, "--num-workers", 2, "--device", "cpu", "--seed", 0,
              *with_policy(demo, options)], f"train_{name}.log")


def evaluate(demo: Demo, name: str, options: list) -> dict:
    """The scores file of checkpoint `name` (with `options`: another reduction, no retraining),
    with the tokens per stage added."""
    import segm
    from segm.config import load_yaml
    from segm.data.base import variant_normalization
    from segm.eval.miou import scores_path
    from segm.policy_choice import apply_policy_choice, policy_choice

    ckpt = demo.ckpt(name)
    args = [str(a) for a in with_policy(demo, options)]
    choice = policy_choice(**_choice_kwargs(args)) if args else None
    model, variant = apply_policy_choice(*segm.load_model(ckpt), choice)
    model.normalization = variant_normalization(variant)
    path = scores_path(ckpt.parent, False, choice, model)
    if not path.is_file():
        demo.run([PY, "-m", "segm.eval.miou", ckpt, "synthetic", "--data-root", demo.data_root, "--singlescale",
                  "--device", "cpu", *args], f"eval_{name}_{path.stem}.log")
    scores = load_yaml(path)
    scores["stage_tokens"] = stage_tokens(model, demo)
    return {k: scores[k] for k in ("mean_iou", "pixel_accuracy", "stage_tokens")}


def _choice_kwargs(args: list) -> dict:
    keys = {"--policy-method": "policy_method", "--num-tokens-shared": "num_tokens_shared",
            "--policynet-ckpt": "policynet_ckpt", "--reducer": "reducer"}
    out = {keys[k]: v for k, v in zip(args[::2], args[1::2])}
    if "num_tokens_shared" in out:
        out["num_tokens_shared"] = int(out["num_tokens_shared"])
    return out


def stage_tokens(model, demo: Demo) -> list:
    """Tokens after the embedding and each merge stage: the static counts, or (a count that
    depends on the batch) the mean over the validation images, each image's 4 windows one batch."""
    import numpy as np
    import torch
    from PIL import Image

    from segm.data.base import STATS

    n = model.grid[0] * model.grid[1]
    static = getattr(model.reducer, "stage_tokens", lambda: None)()
    if static is not None:  # ALGM; on CTS, the N patches first
        return static if static[0] == n else [n, *static]
    t = model.reducer.static_tokens(model.grid)
    if t is not None:
        return [n] if t == n else [n, t]
    stats = STATS[model.normalization]
    mean, std = (torch.tensor(stats[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    crop = model.crop_size[0]
    counts = []
    for path in sorted((demo.data_root / "images" / "validation").iterdir()):
        im = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        im = (im - mean) / std
        windows = im.unfold(2, crop, crop).unfold(3, crop, crop).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, crop, crop)
        with torch.no_grad():
            counts.append(model.forward_all(windows).token_map.record.stage_tokens)
    first = [n] if counts[0][0] != n else []
    return first + [round(float(np.mean(c)), 1) for c in zip(*counts)]


def render(rows: list, style: str) -> str:
    lines = ["| trained with | evaluated with | tokens per stage | mIoU | pixel acc |", "|---|---|---|---|---|"]
    for trained, used, sc in rows:
        tokens = " → ".join(str(t) for t in sc["stage_tokens"])
        lines.append(f"| {trained} | {used} | {tokens} | {sc['mean_iou']:.2f} | {sc['pixel_accuracy']:.2f} |")
    return f"Synthetic, {style} style (ViT-Ti/16, 128-px windows; 64 tokens without reduction)\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
