"""History: the host-side record of every observed step (numpy arrays)."""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gradwatch.detect import Event

__all__ = ["History"]

#: per-step 1-D columns and their dtypes (besides the [S, P] matrices)
_SCALARS = ("total", "total_clipped", "clip_coef", "clip_threshold", "scale")
_FORMAT = 1


class History:
    """Everything GradWatch recorded, one row per observed optimizer step.

    The per-step columns are numpy arrays (properties below), one row per
    observed step: ``steps``, ``norms`` and ``norms_clipped`` ``[S, P]``,
    ``grad_missing``, ``total``, ``total_clipped``, ``clip_coef``,
    ``clip_threshold``, ``scale`` and ``taps``. A parameter whose ``.grad`` was
    None at a step is recorded with norm 0 and flagged in ``grad_missing``; NaN
    and Inf are kept as they were.

    Attributes:
        names: parameter names, in model order (``P`` of them).
        events: the :class:`~gradwatch.Event` list, in step order.
        tap_names: names of tapped tensors (:meth:`GradWatch.tap`), the columns of ``taps``.
        meta: free-form description of the run (clipper, detectors, ...).

    Example:
        >>> h = History(["w", "b"])
        >>> h.append(steps=[0, 1], norms=[[3.0, 4.0], [1.0, 0.0]])
        >>> len(h), h["w"].tolist(), h.total.tolist()
        (2, [3.0, 1.0], [5.0, 1.0])
    """

    def __init__(self, names: Sequence[str], meta: dict[str, Any] | None = None) -> None:
        self.names = list(names)
        self.meta: dict[str, Any] = dict(meta or {})
        self.events: list[Event] = []
        self.tap_names: list[str] = []
        self._chunks: list[dict[str, np.ndarray]] = []
        self._cache: dict[str, np.ndarray] | None = None

    # -- building -----------------------------------------------------------------
    def append(
        self,
        steps: Sequence[int] | np.ndarray,
        norms: Sequence[Sequence[float]] | np.ndarray,
        *,
        norms_clipped: np.ndarray | None = None,
        grad_missing: np.ndarray | None = None,
        total: np.ndarray | None = None,
        total_clipped: np.ndarray | None = None,
        clip_coef: np.ndarray | None = None,
        clip_threshold: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        taps: dict[str, np.ndarray] | None = None,
        events: Sequence[Event] = (),
    ) -> None:
        """Add rows; omitted columns take their "nothing happened" values.

        The keyword columns (``norms_clipped``, ``grad_missing``, ``total``,
        ``total_clipped``, ``clip_coef``, ``clip_threshold``, ``scale``) have the
        shapes of the properties of the same names.

        Args:
            steps: ``[n]`` step indices.
            norms: ``[n, P]`` pre-clip norms.
            taps: ``{name: [n]}`` tapped-tensor gradient norms.
            events: events of these rows.

        Raises:
            ValueError: a column's shape does not match.
        """
        norms = np.asarray(norms)
        if norms.dtype.kind != "f":
            norms = norms.astype(np.float64)
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        n = len(steps)
        if norms.shape != (n, len(self.names)):
            raise ValueError(f"norms must have shape {(n, len(self.names))}, got {norms.shape}")
        if total is None:
            total = np.sqrt(np.square(norms.astype(np.float64)).sum(axis=1)).astype(norms.dtype)
        total = np.asarray(total, dtype=norms.dtype).reshape(n)
        chunk = {
            "steps": steps,
            "norms": norms,
            "norms_clipped": norms if norms_clipped is None else np.asarray(norms_clipped, dtype=norms.dtype),
            "grad_missing": np.zeros(norms.shape, bool) if grad_missing is None else np.asarray(grad_missing, bool),
            "total": total,
            "total_clipped": total if total_clipped is None else np.asarray(total_clipped, dtype=norms.dtype),
            "clip_coef": np.ones(n, norms.dtype) if clip_coef is None else np.asarray(clip_coef, dtype=norms.dtype),
            "clip_threshold": np.full(n, np.nan, norms.dtype)
            if clip_threshold is None
            else np.asarray(clip_threshold, dtype=norms.dtype),
            "scale": np.full(n, np.nan, norms.dtype) if scale is None else np.asarray(scale, dtype=norms.dtype),
        }
        for key in ("norms_clipped", "grad_missing"):
            if chunk[key].shape != norms.shape:
                raise ValueError(f"{key} must have shape {norms.shape}, got {chunk[key].shape}")
        for key in _SCALARS:
            if chunk[key].shape != (n,):
                raise ValueError(f"{key} must have shape {(n,)}, got {chunk[key].shape}")
        taps = taps or {}
        for name in taps:
            if name not in self.tap_names:
                self.tap_names.append(name)
        tap_mat = np.full((n, len(self.tap_names)), np.nan, dtype=norms.dtype)
        for name, col in taps.items():
            tap_mat[:, self.tap_names.index(name)] = col
        chunk["taps"] = tap_mat
        self._chunks.append(chunk)
        self.events.extend(events)
        self._cache = None

    def _col(self, key: str) -> np.ndarray:
        if self._cache is None:
            self._cache = {}
        if key not in self._cache:
            if not self._chunks:
                width = {"norms": len(self.names), "norms_clipped": len(self.names), "grad_missing": len(self.names)}
                dtype = {"steps": np.int64, "grad_missing": bool}.get(key, np.float64)
                shape = (0, width[key]) if key in width else (0, len(self.tap_names)) if key == "taps" else (0,)
                self._cache[key] = np.zeros(shape, dtype)
            elif key == "taps":
                k = len(self.tap_names)
                parts = [
                    np.pad(c["taps"], ((0, 0), (0, k - c["taps"].shape[1])), constant_values=np.nan)
                    for c in self._chunks
                ]
                self._cache[key] = np.concatenate(parts)
            else:
                self._cache[key] = np.concatenate([c[key] for c in self._chunks])
        return self._cache[key]

    # -- reading ------------------------------------------------------------------
    steps = property(lambda self: self._col("steps"), doc="``int64 [S]`` optimizer step of each row.")
    norms = property(
        lambda self: self._col("norms"), doc="``[S, P]`` pre-clip L2 norms (0 where ``.grad`` was None; NaN kept)."
    )
    norms_clipped = property(lambda self: self._col("norms_clipped"), doc="``[S, P]`` post-clip L2 norms.")
    grad_missing = property(lambda self: self._col("grad_missing"), doc="``bool [S, P]``: True where .grad was None.")
    total = property(lambda self: self._col("total"), doc="``[S]`` global norm before clipping.")
    total_clipped = property(lambda self: self._col("total_clipped"), doc="``[S]`` global norm after clipping.")
    clip_coef = property(
        lambda self: self._col("clip_coef"), doc="``[S]`` factor applied to the global norm (1.0 = not clipped)."
    )
    clip_threshold = property(
        lambda self: self._col("clip_threshold"), doc="``[S]`` bound the clipper enforced (NaN: no global bound)."
    )
    scale = property(lambda self: self._col("scale"), doc="``[S]`` GradScaler scale (NaN without one).")
    taps = property(lambda self: self._col("taps"), doc="``[S, K]`` gradient norms of tapped tensors.")

    def __len__(self) -> int:
        return sum(len(c["steps"]) for c in self._chunks)

    def __getitem__(self, name: str) -> np.ndarray:
        """The pre-clip norm column of parameter ``name`` (or of a tapped tensor).

        Raises:
            KeyError: unknown name; the message lists the closest names.
        """
        if name in self.names:
            return self.norms[:, self.names.index(name)]
        if name in self.tap_names:
            return self.taps[:, self.tap_names.index(name)]
        close = difflib.get_close_matches(str(name), self.names + self.tap_names, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; names are {self.names[:10]}"
        raise KeyError(f"no parameter named {name!r} in this history{hint}")

    def __repr__(self) -> str:
        return f"History({len(self)} steps x {len(self.names)} parameters, {len(self.events)} events)"

    @property
    def clip_fraction(self) -> float:
        """Fraction of recorded steps where clipping bound (``clip_coef < 1``); NaN if empty."""
        coef = self.clip_coef
        return float(np.mean(coef < 1.0)) if len(coef) else math.nan

    def events_of(self, kind: str | None = None, name: str | None = None) -> list[Event]:
        """The events of one ``kind`` and/or parameter ``name`` (None matches all)."""
        return [e for e in self.events if (kind is None or e.kind == kind) and (name is None or e.name == name)]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per parameter: max, median and last norm, steps clipped, events.

        NaN steps are left out of max/median (``nonfinite`` counts them).
        """
        rows = []
        clipped = self.norms_clipped < self.norms
        for j, name in enumerate(self.names):
            col = self.norms[:, j]
            fin = col[np.isfinite(col)]
            rows.append(
                {
                    "name": name,
                    "max": float(fin.max()) if fin.size else math.nan,
                    "median": float(np.median(fin)) if fin.size else math.nan,
                    "last": float(col[-1]) if col.size else math.nan,
                    "nonfinite": int((~np.isfinite(col)).sum()),
                    "clipped": int(clipped[:, j].sum()),
                    "events": sum(1 for e in self.events if e.name == name),
                }
            )
        return rows

    def grouped(self, by: int | Callable[[str], str]) -> History:
        """A history whose columns are groups of parameters, for models with many tensors.

        A group's norm is the L2 norm of its members' norms (the norm of all
        their gradients together), before and after clipping; a group's
        gradient is missing only if all its members' are. Totals, steps and
        events carry over (events renamed to their group).

        Args:
            by: a module depth (``1`` groups ``"layers.3.attn.weight"`` under
                ``"layers"``, ``2`` under ``"layers.3"``), or a function from
                parameter name to group name.

        Raises:
            ValueError: ``by`` is neither a depth >= 1 nor a callable.

        Example:
            >>> h = History(["enc.0.w", "enc.1.w", "head.w"]); h.append([0], [[3.0, 4.0, 1.0]])
            >>> g = h.grouped(1)
            >>> g.names, g.norms.tolist()
            (['enc', 'head'], [[5.0, 1.0]])
        """
        if callable(by):
            key = by
        elif isinstance(by, int) and not isinstance(by, bool) and by >= 1:

            def key(name: str) -> str:
                return ".".join(name.split(".")[:by])
        else:
            raise ValueError(f"by must be a module depth >= 1 or a callable name -> group, got {by!r}")
        groups: dict[str, list[int]] = {}
        for j, name in enumerate(self.names):
            groups.setdefault(str(key(name)), []).append(j)
        out = History(list(groups), {**self.meta, "grouped_by": repr(by)})
        out.tap_names = list(self.tap_names)
        if len(self):

            def l2(mat: np.ndarray) -> np.ndarray:
                cols = [np.sqrt(np.square(mat[:, idx].astype(np.float64)).sum(axis=1)) for idx in groups.values()]
                return np.stack(cols, axis=1).astype(mat.dtype)

            chunk = {k: self._col(k) for k in ("steps", "taps", *_SCALARS)}
            chunk["norms"] = l2(self.norms)
            chunk["norms_clipped"] = l2(self.norms_clipped)
            chunk["grad_missing"] = np.stack([self.grad_missing[:, idx].all(axis=1) for idx in groups.values()], 1)
            out._chunks.append(chunk)
        out.events = [e if e.name is None else replace(e, name=str(key(e.name))) for e in self.events]
        return out

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the history to a ``.npz`` file (exact round trip with :meth:`load`)."""
        events = [[e.step, e.kind, e.name, e.value, e.threshold] for e in self.events]
        arrays = {key: self._col(key) for key in ("steps", "norms", "norms_clipped", "grad_missing", "taps", *_SCALARS)}
        header = {
            "format": _FORMAT,
            "names": self.names,
            "tap_names": self.tap_names,
            "meta": self.meta,
            "events": events,
        }
        with open(path, "wb") as f:
            np.savez_compressed(f, gradwatch=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        """Read a history written by :meth:`save`.

        Raises:
            ValueError: the file is not a gradwatch history.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["gradwatch"]))
                arrays = {k: z[k] for k in z.files if k != "gradwatch"}
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{os.fspath(path)!r} is not a gradwatch history (.npz written by History.save)") from exc
        h = cls(header["names"], header.get("meta"))
        h.tap_names = list(header.get("tap_names", []))
        if len(arrays["steps"]):
            chunk = {k: arrays[k] for k in ("steps", "norms", "norms_clipped", "grad_missing", "taps", *_SCALARS)}
            h._chunks.append(chunk)
        h.events = [
            Event(int(s), k, n, float(v), None if t is None else float(t)) for s, k, n, v, t in header["events"]
        ]
        return h
