"""An exported model (`python -m segm.export`) in ONNX Runtime, usable where inference expects a
Segmenter: `segm.inference --onnx MODEL.onnx`, `segm.inference.predict_image`, the sliding
windows of `segm.eval.window` and `segm.bench --with-onnxruntime`.

    model = OnnxSegmenter("model.onnx")          # reads model.json beside it
    logits = model(images)                       # (B, 3, H, W) normalised float → (B, K, H, W)
    labels = model.forward_labels(images)        # → (B, H, W) int64, the argmax over classes

A graph exported with `--output labels` returns labels only (`output` "labels"): it has
`forward_labels`, and asking it for logits (`__call__`, `forward_all`) is an `OnnxModelError`.
A quantised graph (`--quantize int8`) runs as any other; `quantization` is the sidecar's record.

The sidecar may come from a stranger: it is checked field by field, against itself, against
the session's input and outputs, and bound to the graph by its bytes' SHA-256
(`segm.export.schema`, `segm.export.sidecar.check_bound`) before anything reads it; the model's
`variant` is made from its fields (`deployment_variant`).

The graph takes images normalised as the sidecar says ((x/255 − mean)/std), as the eager model
does. The model describes its reduction as a Segmenter does (`reduction_method`,
`describe_reduction()`, from the sidecar's `reducer`), and `forward_all` rebuilds the token map
from the graph's outputs: a `token_of_cell` output (ALGM) is the map itself; CTS's
`shared_idx` gives its layout; a graph that returns only logits
gives the identity map when no token is merged, else a map whose cells are all `UNKNOWN_TOKEN`
(the graph does not say which token covers which cell; `num_tokens` is still the reducer's T).

A model exported for a fixed batch B runs batches of B: a shorter batch (the last chunk of
sliding windows) is padded by repeating its last image and the padding's outputs are dropped
(images in a batch are computed independently, so this changes nothing); a longer one is an error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segm.export.schema import LABELS, LOGITS, check_graph
from segm.export.sidecar import (check_bound, deployment_variant, read_sidecar, reduction_description,
                                 sidecar_path)
from segm.model.reduction.rules import NONE

__all__ = ["OnnxModelError", "OnnxSegmenter", "UNKNOWN_TOKEN", "load_for_inference", "session_options"]

UNKNOWN_TOKEN = -1  # a token map's cell whose token the exported graph does not report


class OnnxModelError(ValueError):
    """A file that is not an exported model, or a call the model was not exported for."""


def session_options(threads: int | None = None, spinning: bool = True):
    """ONNX Runtime session options: all graph optimisations; `threads` intra-op threads (None:
    ONNX Runtime's default, one per physical core). `spinning=False` stops idle worker threads
    from spin-waiting for work: the right choice when other thread pools (other sessions, torch)
    share the cores, as in `segm.bench`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _session(path: Path, threads: int | None, spinning: bool):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(threads, spinning), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own (pybind) types for unreadable models
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OnnxModelError(f"{path} is not an ONNX model ONNX Runtime can load ({first})") from None


def _checked_sidecar(path: Path, session) -> dict:
    """The sidecar of `path`: its fields checked, bound to this graph's bytes, and describing
    the session's input and outputs (`segm.export.schema`)."""
    side = read_sidecar(path)
    check_bound(side, path)
    nodes = lambda args: [(a.name, a.type, list(a.shape)) for a in args]  # noqa: E731
    check_graph(side, sidecar_path(path), path.name, nodes(session.get_inputs()), nodes(session.get_outputs()))
    return side


class OnnxSegmenter:
    """An exported model in an ONNX Runtime CPU session, with the attributes that consumers read
    from a Segmenter (`n_cls`, `crop_size`, `patch_size`, `grid`, `reduction_method`,
    `describe_reduction()`, `shares_tokens`, `needs_labels`, `variant`) and its calls (`__call__`,
    `forward_all`, `to`, `eval`, `train`, `parameters`)."""

    needs_labels = False
    training = False

    def __init__(self, path, *, threads: int | None = None, spinning: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.session = _session(self.path, threads, spinning)
        self.info = _checked_sidecar(self.path, self.session)
        self.output_names = list(self.info["outputs"])
        self.output = self.info.get("output", LOGITS)  # the first output: logits or labels
        self.quantization = self.info.get("quantization")  # None: fp32
        self.batch_size = self.info["batch_size"]  # None: any batch
        self.n_cls = self.info["n_cls"]
        self.crop_size = tuple(self.info["crop"])
        self.patch_size = self.info["patch_size"]
        self.grid = (self.crop_size[0] // self.patch_size, self.crop_size[1] // self.patch_size)
        self.reduction = reduction_description(self.info)
        self.variant = deployment_variant(self.info)
        self._device = torch.device("cpu")

    @property
    def reduction_method(self) -> str:
        """The reducer's registered name (`none`, `cts`, ...), as `Segmenter.reduction_method`."""
        return self.reduction["reducer"]

    def describe_reduction(self) -> dict:
        """`Segmenter.describe_reduction()` of the exported model (the sidecar's `reducer`)."""
        return dict(self.reduction)

    @property
    def shares_tokens(self) -> bool:
        return self.reduction_method != NONE

    def check_batch(self, n: int, option: str = "batch size") -> None:
        """Refuses `n` images per call when the model was exported for another fixed batch."""
        if self.batch_size is not None and n != self.batch_size:
            raise OnnxModelError(
                f"{self.path.name} was exported for batch {self.batch_size}, not {option} {n}: use {option} "
                f"{self.batch_size}, or re-export: python -m segm.export CHECKPOINT {self.path.name} --batch-size {n} "
                "(or --dynamic-batch)")

    def run(self, im: torch.Tensor) -> dict[str, torch.Tensor]:
        """All outputs of a batch of images (padded to the exported batch if shorter)."""
        b = im.shape[0]
        if self.batch_size is not None and b > self.batch_size:
            self.check_batch(b)
        x = im.detach().to("cpu", torch.float32).contiguous()
        if tuple(x.shape[1:]) != (3, *self.crop_size):
            raise OnnxModelError(f"{self.path.name} takes images (B, 3, {self.crop_size[0]}, {self.crop_size[1]}), "
                                 f"got {tuple(x.shape)}")
        if self.batch_size is not None and b < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - b, -1, -1, -1)])
        names = self.output_names
        outs = self.session.run(names, {self.info["input"]["name"]: x.numpy()})
        return {n: torch.from_numpy(np.ascontiguousarray(o[:b])).to(im.device) for n, o in zip(names, outs)}

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        return self.forward_all(im).logits

    def forward_all(self, im: torch.Tensor):
        """`Segmenter.forward_all`'s output: SegmenterOutput(logits, None, token map)."""
        from segm.model.segmenter import SegmenterOutput

        if self.output == LABELS:
            raise OnnxModelError(f"{self.path.name} was exported with --output labels: it returns labels, not "
                                 "logits (use forward_labels, or re-export with --output logits)")
        out = self.run(im)
        return SegmenterOutput(out[LOGITS], None, self.token_map(out, im.shape[0], im.device))

    def forward_labels(self, im: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64: `Segmenter.forward_labels`, the labels graph's output, or the argmax
        over classes of a logits graph's (the lower class on ties)."""
        out = self.run(im)
        return out[LABELS] if self.output == LABELS else out[LOGITS].argmax(1)

    def token_map(self, out: dict[str, torch.Tensor], batch: int, device):
        """The batch's `TokenMap` from the graph's outputs (see the module docstring)."""
        from segm.model.reduction.base import TokenMap, identity_map

        if "token_of_cell" in out:  # a reducer that reports its composed map (ALGM)
            return TokenMap(out["token_of_cell"], self.grid, self.reduction.get("tokens"))
        if "shared_idx" in out:  # CTS's record (segm.export.graph)
            from segm.model.reduction import cts
            from segm.model.reduction.cts_reducer import CtsRecord

            layout = cts.layout_from_shared(out["shared_idx"], self.grid)
            return cts.layout_map(layout, CtsRecord(layout, out.get("scores"), None))
        n = self.grid[0] * self.grid[1]
        tokens = self.reduction.get("tokens")
        if tokens == n:
            return identity_map(batch, self.grid, device)
        unknown = torch.full((batch, n), UNKNOWN_TOKEN, dtype=torch.int64, device=device)
        return TokenMap(unknown, self.grid, tokens)

    # ------------------------------------------------------ what inference calls on a Segmenter
    def to(self, device):
        """Inputs may live on any device; the session runs on the CPU, results return to the input's device."""
        self._device = torch.device(device)
        return self

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise OnnxModelError("an ONNX model runs inference only")
        return self

    def parameters(self):
        """Where inference puts the inputs (it asks a model's first parameter for its device)."""
        yield torch.empty(0, device=self._device)


def load_for_inference(onnx_path, model_path, policy_choice, window_batch_size: int):
    """`segm.inference --onnx`: (OnnxSegmenter, its variant), refusing what an exported model
    cannot do (another policy, a window batch it was not exported for)."""
    if onnx_path is None:
        raise OnnxModelError("give --model-path CHECKPOINT or --onnx MODEL.onnx")
    if model_path is not None:
        raise OnnxModelError("give --model-path CHECKPOINT or --onnx MODEL.onnx, not both")
    if policy_choice is not None:
        raise OnnxModelError("an ONNX model's reduction is fixed at export: re-export the checkpoint with "
                             "python -m segm.export CHECKPOINT OUT.onnx --policy-method ... (or --reducer ...)")
    model = OnnxSegmenter(onnx_path)
    model.check_batch(window_batch_size, "--window-batch-size")
    return model, model.variant
