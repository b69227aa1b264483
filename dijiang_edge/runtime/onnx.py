"""Run an exported ONNX folder with onnxruntime and numpy only (no torch).

An export holds, per quantization, a prefill graph (``role: prefill``, any ``seq``),
a decode graph (``role: decode``, ``seq == 1``) and/or one graph for both; they share
one weights file.  ``OnnxRunner`` carries the recurrent state between calls, feeds
long prompts in blocks of the manifest's ``prefill_block`` tokens (each block is one
exact chunk of the chunked form) and decodes one token per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from . import input_ids, vocab_of
from ..manifest import FileEntry, Manifest, verify_files


def session(folder: Path, entry: FileEntry, threads: int = 0, verify: bool = True, spin: bool = True):
    """An ``onnxruntime.InferenceSession`` for ``entry``, with damaged files refused clearly.

    ``spin=False`` stops idle worker threads from busy-waiting: needed when the process
    alternates onnxruntime with other work (PyTorch in the parity checks)."""
    import onnxruntime as ort
    if verify:
        verify_files(folder, entry)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    path = folder / entry["path"]
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DiJiangError(f"onnxruntime could not load {path} ({type(e).__name__}: {str(e)[:200]}); "
                           f"the file is damaged or not a dijiang-export file: re-export the folder") from None


def companion(manifest: Manifest, entry: FileEntry, role: str) -> FileEntry:
    """The file that serves ``role`` beside ``entry``: itself, else one of its quantization,
    the same attention kind first (plain prefill with plain decode), then the default."""
    if entry.get("role") in (role, "both"):
        return entry
    same = [f for f in manifest["files"] if f["format"] == entry["format"] and f["quant"] == entry["quant"]
            and f.get("role") in (role, "both")]
    same.sort(key=lambda f: (f.get("attention") != entry.get("attention"), not f.get("default", False)))
    if not same:
        raise DiJiangError(f"the folder has no {role} file for onnx/{entry['quant']}; re-export it")
    return same[0]


class OnnxRunner:
    """One sequence: ``forward(ids [B, T], keep=0) -> logits [B, T or keep, V]``, state
    carried between calls.  ``keep`` goes to the graphs as ``logits_to_keep`` (files
    exported before that input existed return every row, and the runner slices)."""

    def __init__(self, folder: Path, entry: FileEntry, manifest: Manifest, threads: int = 0, verify: bool = True,
                 spin: bool = True):
        self.entry, self.manifest = entry, manifest
        self.vocab_size = vocab_of(entry, manifest)
        self.prefill_entry = companion(manifest, entry, "prefill")
        self.decode_entry = companion(manifest, entry, "decode")
        self.prefill = session(folder, self.prefill_entry, threads, verify, spin)
        self.decode = self.prefill if self.decode_entry is self.prefill_entry else \
            session(folder, self.decode_entry, threads, verify, spin)
        self.block = int(self.prefill_entry.get("prefill_block", 0)) or 1 << 30
        self.keeps = {id(x): "logits_to_keep" in {i.name for i in x.get_inputs()} for x in (self.prefill, self.decode)}
        self.state_names = [s["name"] for s in entry["inputs"]["state"]]
        self.state_shapes = [list(s["shape"][1:]) for s in entry["inputs"]["state"]]
        self.reset()

    def reset(self, batch: int = 1) -> None:
        """Start a new sequence: zero state, position 0."""
        self.state = [np.zeros([batch, *s], np.float32) for s in self.state_shapes]
        self.pos = 0

    def _run(self, sess, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        feed = {"input_ids": ids, "start_pos": np.array([self.pos], np.int64)}
        if self.keeps[id(sess)]:
            feed["logits_to_keep"] = np.array([keep], np.int64)
        feed.update(zip(self.state_names, self.state))
        out = sess.run(None, feed)
        self.state, self.pos = out[1:], self.pos + ids.shape[1]
        return out[0][:, -keep:] if keep else out[0]

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits of the last ``keep`` positions of ``ids`` (0: every position)."""
        ids = input_ids(ids, self.vocab_size)
        if keep < 0:
            raise DiJiangError(f"keep must be >= 0 (0: every position), got {keep}")
        if self.pos == 0 and ids.shape[0] != self.state[0].shape[0]:
            self.reset(ids.shape[0])
        if ids.shape[1] == 1:
            return self._run(self.decode, ids)
        t, need = ids.shape[1], min(keep, ids.shape[1]) or ids.shape[1]
        parts = []
        for i in range(0, t, self.block):
            piece = ids[:, i:i + self.block]
            want = need - (t - i - piece.shape[1])      # rows of this piece among the last `need`
            lg = self._run(self.prefill, piece, min(max(want, 1), piece.shape[1]))
            if want > 0:
                parts.append(lg)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def open(folder: Path, entry: FileEntry, manifest: Manifest, threads: int = 0) -> OnnxRunner:   # noqa: A001
    """The runtime entry point used by ``dijiang_edge.runtime.open_export``."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DiJiangError("running .onnx files needs onnxruntime: `pip install onnxruntime`") from None
    return OnnxRunner(Path(folder), entry, manifest, threads)
