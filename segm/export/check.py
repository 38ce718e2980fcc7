"""The parity check of an export: the ONNX model in ONNX Runtime against the eager model, on
random inputs, inputs whose scores tie, and optionally real validation crops.

Eager runs `forward_all(im, given=reducer.export_given(B))`, the graph's constant where it has
one; the graph's outputs after the logits are the reducer's record of its selection
(`Reducer.export_outputs`; CTS: `shared_idx`, `scores`), compared with eager's record.
What must hold (else `ExportError`, and nothing is written):
- the record's float outputs (the policy's scores) agree within `SCORE_TOL` (relative to their size);
- given the graph's own selection input (`Reducer.given_from_outputs`: CTS's scores), eager
  selects exactly the same (the tie rule: lower raster index first) and its logits agree
  within `LOGIT_TOL` (a labels graph's labels: equal to eager `forward_labels`' but where eager's
  logits of the two classes lie within `LOGIT_TOL`, a tie float rounding may break either way).
Reported beside: the end-to-end logit difference and argmax agreement against eager on its own
scores. Where float rounding reorders two scores that tie within `SCORE_TOL` (possible with
the policy network, whose convolutions the two runtimes round differently), that image's
selection differs end to end; this is counted as a near tie, not a failure. A graph with no
record (plain models) is compared on its logits.
"""
from __future__ import annotations

import torch

from segm.export.graph import ExportError
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


def _same_selection(a: dict, b: dict) -> torch.Tensor:
    """(B,) bool: every integer output (a selection) of two records agrees, image by image."""
    same = torch.ones(len(next(iter(a.values()))), dtype=torch.bool)
    for name, x in a.items():
        if not x.is_floating_point():
            same &= (x == b[name]).flatten(1).all(1).cpu()
    return same


def _diff(eager: torch.Tensor, graph: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Logits: the largest |difference|; labels: the share of pixels labelled differently;
    over the images `keep` (B,) selects (all by default)."""
    if keep is not None:
        eager, graph = eager[keep], graph[keep]
    if not eager.numel():
        return 0.0
    if eager.is_floating_point():
        return float((eager - graph).abs().max())
    return float((eager != graph).double().mean())


def _label_gap(logits: torch.Tensor, graph_labels: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """How far below eager's best logit the graph's label lies, at worst: 0 where they agree; a
    label that differs by float rounding (two classes within the logit tolerance) is no error."""
    if keep is not None:
        logits, graph_labels = logits[keep], graph_labels[keep]
    if not logits.numel():
        return 0.0
    gap = logits.amax(1) - logits.gather(1, graph_labels.long().unsqueeze(1)).squeeze(1)
    return float(gap.max())


@torch.no_grad()
def compare(model: Segmenter, outputs: list, im: torch.Tensor) -> dict:
    """One input's comparison (see the module docstring); `outputs`: the graph's outputs, in
    order (arrays or tensors). A first output of integers is a labels graph's, compared with
    eager `forward_labels`; `diff` and `end_to_end_diff` are then shares of changed labels and
    `label_gap` the largest eager logit gap behind a changed label."""
    reducer = model.reducer
    first = torch.as_tensor(outputs[0])
    labels = not first.is_floating_point()

    def predict(given):  # eager forward_labels is the logits' argmax bit for bit: one forward serves both
        out = model.forward_all(im, given=given)
        return (out.logits.argmax(1) if labels else out.logits), out.token_map, out.logits

    eager, eager_map, eager_logits = predict(reducer.export_given(im.shape[0]))
    eager_record = reducer.export_outputs(eager_map)
    res = {"images": im.shape[0], "near_ties": 0, "score_diff": 0.0, "selection_given_scores": True}
    if len(outputs) > 1:
        record = {name: torch.as_tensor(o) for name, o in zip(eager_record, outputs[1:])}
        res["score_diff"] = max((float(((record[n] - x).abs() / x.abs().clamp_min(1)).max())
                                 for n, x in eager_record.items() if x.is_floating_point() and x.numel()), default=0.0)
        same = _same_selection(record, eager_record)
        res["near_ties"] = int((~same).sum())
        given, given_map, given_logits = predict(reducer.given_from_outputs(record))  # eager on the graph's scores
        res["selection_given_scores"] = bool(_same_selection(record, reducer.export_outputs(given_map)).all())
        res["diff"] = _diff(given, first)
        res["end_to_end_diff"] = _diff(eager, first, same)  # images whose selection agrees
        gaps = (_label_gap(given_logits, first), _label_gap(eager_logits, first, same)) if labels else (0.0,)
    else:
        res["diff"] = res["end_to_end_diff"] = _diff(eager, first)
        gaps = (_label_gap(eager_logits, first),) if labels else (0.0,)
    ort_labels, eager_labels = (first, eager) if labels else (first.argmax(1), eager.argmax(1))
    res["argmax_agreement"] = float((eager_labels == ort_labels).double().mean())
    res["labels"] = labels
    res["label_gap"] = max(gaps)
    return res


def failure(name: str, r: dict) -> str | None:
    """What is wrong with one input's comparison (`compare`), or None."""
    if r["score_diff"] > SCORE_TOL:
        return f"the recorded scores differ by {r['score_diff']:.3g} > {SCORE_TOL:g}"
    if not r["selection_given_scores"]:
        return "the graph selects other tokens than eager from the same scores (tie-breaking)"
    worst = max(r["diff"], r["end_to_end_diff"])
    if r["labels"] and r["label_gap"] > LOGIT_TOL:
        return (f"{100 * worst:.3g} % of the labels differ from eager forward_labels', one by a logit gap of "
                f"{r['label_gap']:.3g} > {LOGIT_TOL:g}")
    if r["labels"]:
        return None
    if worst > LOGIT_TOL:
        return f"max |Δlogits| {worst:.3g} > {LOGIT_TOL:g}"
    return None


def run_check(session, model: Segmenter, inputs: list[tuple]) -> dict:
    """Runs every input through `session` and eager `model`; raises ExportError on the first
    input beyond tolerance. Returns the summary recorded in the sidecar."""
    rows = []
    for name, im in inputs:
        r = compare(model, session.run(None, {INPUT_NAME: im.numpy()}), im)
        problem = failure(name, r)
        if problem:
            raise ExportError(f"parity check failed on input '{name}': {problem}")
        rows.append({"input": name, **r})
    return {
        "inputs": [r["input"] for r in rows],
        "images": sum(r["images"] for r in rows),
        "max_abs_logit_diff": None if rows[0]["labels"] else max(max(r["diff"], r["end_to_end_diff"]) for r in rows),
        "min_argmax_agreement": min(r["argmax_agreement"] for r in rows),
        "max_score_diff": max(r["score_diff"] for r in rows),
        "near_tie_images": sum(r["near_ties"] for r in rows),
        "tolerance": {"logits": LOGIT_TOL, "scores": SCORE_TOL},
    }


def format_check(summary: dict, record: list[str]) -> str:
    """One line; `record`: the graph's outputs after the logits or labels (the reducer's record)."""
    near = summary["near_tie_images"]
    agreement = f"{100 * summary['min_argmax_agreement']:.3f} %"
    if summary["max_abs_logit_diff"] is None:
        text = (f"parity (ONNX Runtime labels vs eager forward_labels, {summary['images']} images): agreement ≥ "
                f"{agreement}")
    else:
        text = (f"parity (ONNX Runtime vs eager, {summary['images']} images): max |Δlogits| "
                f"{summary['max_abs_logit_diff']:.2g} (tolerance {LOGIT_TOL:g}), argmax agreement ≥ {agreement}")
    if not record:
        return text
    return text + (f"; {', '.join(record)}: max score difference {summary['max_score_diff']:.2g}, "
                   + (f"{near} image(s) with a near tie selected differently" if near else "identical selection"))
