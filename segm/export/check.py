"""The parity check of an export: the ONNX model in ONNX Runtime against the eager model, on
random inputs, inputs whose scores tie, and optionally real validation crops.

What must hold (else `ExportError`, and nothing is written):
- the policy's scores agree within `SCORE_TOL` (relative to their size);
- given the graph's own scores, eager selects exactly the same superpatches (the tie rule:
  lower raster index first) and its logits agree within `LOGIT_TOL`.
Reported beside: the end-to-end logit difference and argmax agreement against eager on its own
scores. Where float rounding reorders two scores that tie within `SCORE_TOL` (possible with
the policy network, whose convolutions the two runtimes round differently), that image's
selection differs end to end; this is counted as a near tie, not a failure.
"""
from __future__ import annotations

import torch

from segm.export.graph import ExportError, random_scores
from segm.export.sidecar import INPUT_NAME
from segm.model.segmenter import Segmenter

LOGIT_TOL = 1e-4  # fp32 logits
SCORE_TOL = 1e-4  # policy scores: probabilities (policy_net), minus a colour variance (content)


def check_inputs(model: Segmenter, batch_sizes: list[int], real: torch.Tensor | None = None) -> list[tuple]:
    """[(name, batch)]: random normal images, a constant image (every content score and every
    interior policy score ties; random scores stay random), images of 32-px blocks of four
    colours (content scores all tie at 0), and real crops (already normalised)."""
    h, w = model.crop_size
    g = torch.Generator().manual_seed(0)
    out = []
    for b in batch_sizes:
        which = torch.randint(0, 4, (b, -(-h // 32), -(-w // 32)), generator=g)
        colours = torch.randn(b, 3, 4, generator=g)
        blocks = torch.stack([colours[i][:, which[i]] for i in range(b)])  # (b, 3, h/32, w/32)
        out += [
            (f"random normal, batch {b}", torch.randn(b, 3, h, w, generator=g)),
            (f"constant, batch {b}", torch.full((b, 3, h, w), 0.25)),
            (f"32-px blocks, batch {b}", blocks.repeat_interleave(32, 2).repeat_interleave(32, 3)[..., :h, :w]),
        ]
    if real is not None:
        b = batch_sizes[0]
        out += [(f"validation crops {i}-{i + b - 1}", real[i:i + b]) for i in range(0, len(real) - b + 1, b)]
    return out


def _eager_scores(model: Segmenter, im: torch.Tensor) -> torch.Tensor | None:
    if model.policy_method == "random":
        return random_scores(model, im.shape[0])
    return model.policy_scores(im, None)[0]


@torch.no_grad()
def compare(model: Segmenter, outputs: list, im: torch.Tensor) -> dict:
    """One input's comparison (see the module docstring); `outputs`: the graph's outputs (arrays or tensors)."""
    ort_logits = torch.as_tensor(outputs[0])
    eager_scores = _eager_scores(model, im)
    eager = model.forward_with_scores(im, eager_scores)
    res = {"images": im.shape[0], "near_ties": 0, "score_diff": 0.0, "selection_given_scores": True}
    if len(outputs) > 1:
        ort_idx, ort_scores = torch.as_tensor(outputs[1]), torch.as_tensor(outputs[2])
        res["score_diff"] = float(((ort_scores - eager_scores).abs() / eager_scores.abs().clamp_min(1)).max())
        same = (ort_idx == eager.layout.shared_idx).all(1)
        res["near_ties"] = int((~same).sum())
        given = model.forward_with_scores(im, ort_scores)  # eager on the graph's scores
        res["selection_given_scores"] = bool(torch.equal(given.layout.shared_idx, ort_idx))
        res["logit_diff"] = float((given.logits - ort_logits).abs().max())
        keep = same.view(-1, 1, 1, 1)  # end to end, images whose selection agrees
        res["end_to_end_diff"] = float(((eager.logits - ort_logits).abs() * keep).max())
    else:
        res["logit_diff"] = res["end_to_end_diff"] = float((eager.logits - ort_logits).abs().max())
    res["argmax_agreement"] = float((eager.logits.argmax(1) == ort_logits.argmax(1)).double().mean())
    return res


def _failure(name: str, r: dict) -> str | None:
    if r["score_diff"] > SCORE_TOL:
        return f"policy scores differ by {r['score_diff']:.3g} > {SCORE_TOL:g}"
    if not r["selection_given_scores"]:
        return "the graph selects other superpatches than eager from the same scores (tie-breaking)"
    if max(r["logit_diff"], r["end_to_end_diff"]) > LOGIT_TOL:
        return f"max |Δlogits| {max(r['logit_diff'], r['end_to_end_diff']):.3g} > {LOGIT_TOL:g}"
    return None


def run_check(session, model: Segmenter, inputs: list[tuple]) -> dict:
    """Runs every input through `session` and eager `model`; raises ExportError on the first
    input beyond tolerance. Returns the summary recorded in the sidecar."""
    rows = []
    for name, im in inputs:
        r = compare(model, session.run(None, {INPUT_NAME: im.numpy()}), im)
        problem = _failure(name, r)
        if problem:
            raise ExportError(f"parity check failed on input '{name}': {problem}")
        rows.append({"input": name, **r})
    return {
        "inputs": [r["input"] for r in rows],
        "images": sum(r["images"] for r in rows),
        "max_abs_logit_diff": max(max(r["logit_diff"], r["end_to_end_diff"]) for r in rows),
        "min_argmax_agreement": min(r["argmax_agreement"] for r in rows),
        "max_score_diff": max(r["score_diff"] for r in rows),
        "near_tie_images": sum(r["near_ties"] for r in rows),
        "tolerance": {"logits": LOGIT_TOL, "scores": SCORE_TOL},
    }


def format_check(summary: dict, shares_tokens: bool) -> str:
    near = summary["near_tie_images"]
    text = (f"parity (ONNX Runtime vs eager, {summary['images']} images): max |Δlogits| "
            f"{summary['max_abs_logit_diff']:.2g} (tolerance {LOGIT_TOL:g}), argmax agreement ≥ "
            f"{100 * summary['min_argmax_agreement']:.3f} %")
    if not shares_tokens:
        return text
    return text + (f", max score difference {summary['max_score_diff']:.2g}, "
                   + (f"{near} image(s) with a near tie selected differently" if near
                      else "identical superpatch selection"))
