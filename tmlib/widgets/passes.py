"""How the explorer gets its data: passes of the engine, in the kernel's thread or in the background.

:class:`Passes` is the part of :class:`~tmlib.widgets.explorer.Explorer` that loads checkpoints,
samples and transformation sets, runs :func:`~tmlib.widgets.data.compute` for what the cache lacks,
and runs a selection made in the browser in a thread, in steps, with a cancel button (the drawing
stays in ``explorer.py``). It works on the explorer's own attributes (``cache``, ``status``,
``progress``, the selectors, ``_lock``), set up by ``Explorer.__init__``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from .data import ExplorerData, applicable_measures, compute

__all__ = ["FIRST", "SELECTORS", "PassCancelled", "Passes"]


class PassCancelled(Exception):
    """Raised inside a pass (at the end of a block) when the cancel button was pressed."""


#: The measures a pass started in the browser computes first, with the measure on screen if it is
#: another (:meth:`Passes.first_measures`): one moments state, read by one fused kernel (the pass
#: costs ≈ 1.3–1.7× the bare forwards); the others (same-equivariance, DSES, G-EED: 1.5–2.5× the
#: forwards each) follow in a second pass, after the view is shown.
FIRST = ("NV", "NV (element)", "TV", "SV")
#: The selectors whose change needs a pass (the others only redraw).
SELECTORS = ("checkpoint", "compare", "dataset", "transformation")


class Passes:
    """Passes for the explorer (a mixin of :class:`~tmlib.widgets.explorer.Explorer`)."""

    def _model(self, label: str) -> nn.Module:
        if label not in self._loaded:
            from .. import experiments

            chosen = self.models[label]
            if isinstance(chosen, experiments.ModelSpec):
                chosen = experiments.trained_model(chosen, str(self.data_root), str(self.models_dir), progress=False)
            if not isinstance(chosen, nn.Module):
                raise TypeError(f"models: {label!r} must be an nn.Module or a ModelSpec, got {type(chosen).__name__}")
            self._loaded[label] = chosen.eval()
        return self._loaded[label]

    def _samples(self, label: str) -> Any:
        chosen = self.datasets[label]
        if isinstance(chosen, str):
            from .. import data
            from ..paths import resolve

            return data.load(chosen, "test", n=self.n_samples, root=resolve(self.data_root), seed=self.seed)
        return chosen

    def _transformation_set(self, label: str):
        chosen = self.transformations[label]
        if isinstance(chosen, str):
            from ..experiments import measurement_set

            return measurement_set(chosen)
        return chosen

    def first_measures(self) -> tuple[str, ...]:
        """What the first step of a browser selection computes: :data:`FIRST` and the measure on
        screen (so the view keeps it)."""
        shown = self.measure.value
        return FIRST if shown in FIRST or shown not in self.measure_names else (*FIRST, shown)

    # -- passes ---------------------------------------------------------------------------------
    def _report(self, done: int, total: int) -> None:
        if self._cancel.is_set():
            raise PassCancelled(f"cancelled after {done} of {total} samples")
        self.progress.max = total
        self.progress.value = done

    def _get(self, checkpoint: str, names: Sequence[str] | None = None) -> ExplorerData:
        """The data of ``checkpoint`` on the current dataset and set with the measures ``names``
        (default: all the explorer's): from the cache, or one pass for the measures it lacks (timed
        into :attr:`timings`, the progress bar shown meanwhile), added to the cached data."""
        key = self.key(checkpoint)
        names = self.measure_names if names is None else [name for name in self.measure_names if name in names]
        have = self.cache.peek(key)
        known = set(have.results) | set(have.metadata.get("unavailable", {})) if have is not None else set()
        missing = [name for name in names if name not in known]
        if have is not None and not missing:
            return have
        _, dataset, transformation = key
        self.status.value = f"computing {' · '.join(key)}" + (f": {', '.join(missing)} …" if have else " …")
        self.progress.value, self.progress.layout.visibility = 0, "visible"
        start = time.perf_counter()
        try:
            ts = self._transformation_set(transformation)
            measures, unavailable = applicable_measures(missing, ts)
            if not measures and have is not None:  # none of them can run on this set: nothing to forward
                with self._lock:
                    have.metadata.setdefault("unavailable", {}).update(unavailable)
                return have
            fresh = compute(
                self._model(checkpoint), self._samples(dataset), ts, measures=measures, image=self.image,
                max_st_samples=self.max_st_samples, on_progress=self._report, batch_size=self.batch_size,
                title=f"{checkpoint} | measured on {dataset}, {transformation}")
            fresh.metadata["unavailable"] = unavailable
            with self._lock:  # the panels may be drawing from the cached data in the kernel's thread
                data = self.cache.add(key, fresh)
        finally:
            self.progress.layout.visibility = "hidden"
        label = f"pass {checkpoint}"
        self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - start
        return data

    def _say(self, still: str = "") -> None:
        """The status: what was computed (and in how long) or that it came from the cache."""
        passes = [f"{name[5:]} in {seconds:.1f} s" for name, seconds in self.timings.items()
                  if name.startswith("pass ")]
        how = ("computed " + ", ".join(passes)) if passes else "from cache"
        self.status.value = (f"{how}: {self.data.n_samples} samples × {len(self.data.transformation_labels)} "
                             f"transformations, {self.data.images_forwarded} images forwarded" + still)

    def _on_selection(self, change: dict | None = None) -> None:
        if self._quiet:
            return
        # ipywidgets holds a widget's _property_lock while it applies a state the browser sent:
        # that is how a person's choice is told from a line of code setting the value.
        from_browser = bool(change and getattr(change.get("owner"), "_property_lock", None))
        if not (self.background and from_browser):
            self.compute()
            return
        self.worker = threading.Thread(target=self._compute_in_background, name="tmlib-explorer-pass", daemon=True)
        self._busy(True)
        self.worker.start()

    def _busy(self, busy: bool, browsing: bool = False) -> None:
        """While a background pass runs: the selectors locked (the panels keep showing the
        previous view; with ``browsing``, layer, channel and measure free), the cancel button shown."""
        for name in SELECTORS + ("measure", "layer", "unit"):
            getattr(self, name).disabled = busy and not (browsing and name in ("measure", "layer", "unit"))
        self.cancel.layout.display = None if busy else "none"

    def _compute_in_background(self) -> None:
        """A selection made in the browser, in steps, each shown when done: the selected
        checkpoint with the :data:`FIRST` measures (a cancel here keeps the previous view), then
        the overlaid checkpoints' curves, then the other measures (a cancel there keeps what is
        shown; the measure menu grows when they are there)."""
        start = time.perf_counter()
        try:
            first = self.first_measures()
            self.compute(first, overlays=False)
        except Exception as error:  # shown, not lost in a thread: the view and selection stay as they were
            self._revert()
            if isinstance(error, PassCancelled):
                self.status.value = f"{error} ({time.perf_counter() - start:.1f} s): showing the previous view"
            else:
                self._failed(error)
            self._busy(False)
            return
        self._busy(True, browsing=True)  # the view is there: layers, channels and measures can be browsed
        try:
            for names in (first, None):
                for label in ([self.checkpoint.value] if names is None else []) + self.overlays():
                    self._say(" · computing the other checkpoints and measures …")
                    self._get(label, names)
                with self._lock:
                    self.others = {label: self.cache.peek(self.key(label)) for label in self.overlays()}
                self._on_layer()  # the new curves; then the full measure menu
            self._say()
        except PassCancelled as stop:
            self._say(f" · {stop}: the rest not computed")
        except Exception as error:
            self._failed(error)
        finally:
            self._busy(False)

    def _failed(self, error: Exception) -> None:
        self.status.value = f'<span style="color: #b00">failed: {type(error).__name__}: {error}</span>'

    def _revert(self) -> None:
        """Set the selectors back to the view on screen, without computing."""
        self._quiet = True
        try:
            for name, value in self._shown.items():
                getattr(self, name).value = value
        finally:
            self._quiet = False
