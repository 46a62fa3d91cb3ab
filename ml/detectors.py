"""Anomaly detectors over one service's normalised feature windows, in scikit-learn's style.

Every detector has the same interface, so the scorer, the registry and the evaluation
treat them alike:

    fit(X)              learn normal from X: (n_windows, n_features), oldest first, already
                        normalised (ml.features.Normaliser), and fix ``threshold_`` from
                        scores of windows the model did not learn from (below)
    score_samples(X)    one score per row, **higher is more anomalous** (the opposite of
                        scikit-learn's IsolationForest.score_samples, so that thresholds and
                        scores read the same way for every detector)
    contributions(X)    (n, n_features), each row non-negative and summing to 1: how much
                        each feature makes up of that row's score, for explanations
    predict(X)          1 where score_samples(X) > threshold_, else 0

Rows are consecutive 10 s windows; the recurrent autoencoder reads each row together
with the ``seq_len - 1`` rows before it (the first rows are padded with copies of the
first), so its row ``t`` depends only on rows up to ``t`` and can be scored as it lands.

The threshold is an extreme quantile of normal scores, estimated from cross-validated
scores: the rows are cut into blocks of ``BLOCK_WINDOWS`` and the blocks dealt round-robin
into ``folds`` folds, so every fold spans the whole training range (its slow drifts
and daily rhythm); a model fitted without one fold scores that fold, fold after fold
until ``min_validation`` windows are scored (a day of windows needs one fold, twenty
minutes all four), and the model kept is then fitted on every row.  A log-normal is
fitted to the held-out scores (robustly: median and MAD of the log scores) and the
threshold is its ``1 - false_alarm_rate`` quantile, never below the held-out scores' own
(at the default rate: their largest); the scorer's hysteresis (2 of 3 windows) divides
what gets through again.
Holding out only the last quarter of twenty minutes left 30 windows to fix the
threshold with, and which 30 decided it: docs/benchmarks-ml.md has the numbers.

Detectors are seeded and deterministic; the autoencoder trains on the CPU unless a GPU
is present (``device``) and always scores from weights kept on the CPU.
"""

from __future__ import annotations

import io
import itertools
from abc import ABC, abstractmethod
from statistics import NormalDist
from typing import Any, ClassVar, Self

import numpy as np

BLOCK_WINDOWS = 10  # cross-validation deals blocks of this many consecutive windows into folds
CLIP = 20.0  # normalised inputs are clipped here: a 1000-sigma value is no more anomalous than a 20-sigma one
# The smallest typical reconstruction error (normalised units) the autoencoder divides by:
# a feature that never moved in training is reconstructed perfectly, and must not turn the
# first tiny error into an infinite score.
ERROR_FLOOR = 0.05


class Detector(ABC):
    """The shared part: validation split, threshold, predict and (de)serialisation."""

    name: ClassVar[str]
    min_rows: ClassVar[int] = 8  # windows to fit on, besides a held-out fold
    threshold_: float
    validation_: dict[str, float]

    def __init__(self, *, seed: int = 0, folds: int = 4, min_validation: int = 500, false_alarm_rate: float = 2e-4):
        if folds < 2:
            raise ValueError(f"folds={folds}: cross-validation needs at least 2 folds (one held out, one fitted)")
        self.seed = seed
        self.folds, self.min_validation = folds, min_validation
        self.false_alarm_rate = false_alarm_rate

    def _folds(self, n: int) -> np.ndarray:
        """The fold of each of n rows.  Blocks shrink for short series, so that every fold
        still holds several of them."""
        block = max(1, min(BLOCK_WINDOWS, n // (2 * self.folds)))
        return (np.arange(n) // block) % self.folds

    def _fits(self, n: int) -> bool:
        return n - int(np.bincount(self._folds(n)).max()) >= self.min_rows

    def fit(self, X: np.ndarray) -> Self:
        X = self._check(X)
        if not self._fits(len(X)):
            needed = next(n for n in itertools.count(len(X) + 1) if self._fits(n))
            raise ValueError(f"{self.name}: need at least {needed} windows of normal traffic to fit and validate, "
                             f"got {len(X)}; train on a longer range")
        fold_of = self._folds(len(X))
        held_out: list[np.ndarray] = []
        for fold in range(self.folds):
            self._fit(X, fold_of != fold)
            held_out.append(self._score(X)[fold_of == fold])
            if sum(map(len, held_out)) >= self.min_validation:
                break
        self._fit(X, np.ones(len(X), dtype=bool))
        val = np.concatenate(held_out)
        # Robustly: the median and the MAD of the log scores, so that one odd held-out window
        # (a hiccup, or a near-perfect reconstruction) does not swing the fit either way.
        logs = np.log(np.maximum(val, 1e-12))
        centre = float(np.median(logs))
        spread = 1.4826 * float(np.median(np.abs(logs - centre)))
        z = NormalDist().inv_cdf(1 - self.false_alarm_rate)
        # Never below what the held-out scores show directly: their own 1 - rate quantile,
        # which is their largest score until there are 1 / rate of them.
        empirical = float(np.quantile(val, 1 - self.false_alarm_rate, method="higher"))
        self.threshold_ = max(float(np.exp(centre + z * spread)), empirical)
        self.validation_ = {"windows": float(len(val)), "folds": float(len(held_out)),
                            "score_median": float(np.median(val)), "score_max": float(val.max()),
                            "threshold": self.threshold_}
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return self._score(self._check(X))

    def contributions(self, X: np.ndarray) -> np.ndarray:
        parts = self._parts(self._check(X))
        total = parts.sum(axis=1, keepdims=True)
        return np.divide(parts, total, out=np.full_like(parts, 1.0 / parts.shape[1]), where=total > 0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.score_samples(X) > self.threshold_).astype(np.int8)

    @staticmethod
    def _check(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ValueError(f"expected a finite 2-d array (windows x features), got shape {X.shape}")
        return np.clip(X, -CLIP, CLIP)

    @property
    def context(self) -> int:
        """How many windows a row's score depends on (itself and those before it)."""
        return 1

    @abstractmethod
    def _fit(self, X: np.ndarray, rows: np.ndarray) -> None:
        """Learn from the rows of X where ``rows`` (a boolean mask) is set; the others are
        held out, but a sequence model may read them as context, never as targets."""

    @abstractmethod
    def _score(self, X: np.ndarray) -> np.ndarray: ...

    def _parts(self, X: np.ndarray) -> np.ndarray:
        """Per-feature parts of the score (non-negative).  By default: squared deviation."""
        return X**2

    def get_state(self) -> dict[str, Any]:
        """Everything needed to score again, as plain Python values, arrays and bytes."""
        return {"params": self.get_params(), "threshold": self.threshold_, "validation": self.validation_,
                "fitted": self._get_fitted()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Detector:
        det = cls(**state["params"])
        det.threshold_, det.validation_ = float(state["threshold"]), dict(state["validation"])
        det._set_fitted(state["fitted"])
        return det

    def get_params(self) -> dict[str, Any]:
        return {"seed": self.seed, "folds": self.folds, "min_validation": self.min_validation,
                "false_alarm_rate": self.false_alarm_rate}

    @abstractmethod
    def _get_fitted(self) -> Any: ...

    @abstractmethod
    def _set_fitted(self, fitted: Any) -> None: ...


class IsolationForestDetector(Detector):
    """scikit-learn's IsolationForest on single windows (no sequence)."""

    name = "iforest"

    def __init__(self, *, n_estimators: int = 200, **kw: Any):
        super().__init__(**kw)
        self.n_estimators = n_estimators

    def _fit(self, X: np.ndarray, rows: np.ndarray) -> None:
        from sklearn.ensemble import IsolationForest

        self.model_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(X[rows])

    def _score(self, X: np.ndarray) -> np.ndarray:
        return -self.model_.score_samples(X)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "n_estimators": self.n_estimators}

    def _get_fitted(self) -> Any:
        return self.model_

    def _set_fitted(self, fitted: Any) -> None:
        self.model_ = fitted


class PCADetector(Detector):
    """Distance from normal in the principal subspace of normal windows, and off it.

    Normal windows vary along a few directions (rate and latency rise together).  A
    window's score is its squared residual off that subspace (the Q statistic: a
    combination never seen) plus its Hotelling T^2 inside it (each component's value over
    its normal variance: a familiar combination, but far too much of it), so a latency
    shift along the latencies' own direction is caught as well as a broken correlation."""

    name = "pca"

    def __init__(self, *, variance: float = 0.9, **kw: Any):
        super().__init__(**kw)
        self.variance = variance

    def _fit(self, X: np.ndarray, rows: np.ndarray) -> None:
        X = X[rows]
        self.mean_ = X.mean(axis=0)
        _, s, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
        explained = np.cumsum(s**2) / max(float((s**2).sum()), 1e-12)
        k = min(int(np.searchsorted(explained, self.variance) + 1), X.shape[1] - 1)
        self.components_ = vt[:k]
        self.component_var_ = np.maximum(s[:k] ** 2 / max(len(X) - 1, 1), 1e-2)

    def _parts(self, X: np.ndarray) -> np.ndarray:
        centred = X - self.mean_
        inside = centred @ self.components_.T  # (n, k)
        residual = centred - inside @ self.components_
        # T^2 = x' P diag(1/var) P' x, split per feature as x_j * (P diag(1/var) P' x)_j.
        t2_parts = np.abs(centred * ((inside / self.component_var_) @ self.components_))
        return residual**2 + t2_parts

    def _score(self, X: np.ndarray) -> np.ndarray:
        return self._parts(X).sum(axis=1)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "variance": self.variance}

    def _get_fitted(self) -> Any:
        return {"mean": self.mean_, "components": self.components_, "component_var": self.component_var_}

    def _set_fitted(self, fitted: Any) -> None:
        self.mean_, self.components_ = np.asarray(fitted["mean"]), np.asarray(fitted["components"])
        self.component_var_ = np.asarray(fitted["component_var"])


class RecurrentAutoencoder(Detector):
    """A GRU sequence-to-sequence autoencoder over the last ``seq_len`` windows.

    The encoder GRU reads the sequence into a small code (``latent`` numbers); the decoder
    GRU unrolls that code back into the whole sequence.  Trained on normal traffic only,
    it reconstructs normal sequences well and unusual ones badly.  A row's score is the
    mean over features of its own (last) step's squared error, each in units of that
    feature's typical error on the training rows (as in Malhotra et al., 2016, "LSTM-based
    encoder-decoder for multi-sensor anomaly detection", with a diagonal covariance): a
    request rate five times its normal is a large error for a feature the model usually
    reconstructs to within a few percent, even though it is one feature of eleven."""

    name = "gru_ae"
    min_rows = 12

    def __init__(self, *, seq_len: int = 6, hidden: int = 32, latent: int = 4, epochs: int = 40,
                 max_steps: int = 1500, batch_size: int = 64, learning_rate: float = 3e-3, device: str | None = None,
                 **kw: Any):
        super().__init__(**kw)
        self.seq_len, self.hidden, self.latent = seq_len, hidden, latent
        # ``epochs`` passes over small data, but at most ``max_steps`` updates: a day of windows
        # (8,640) needs a few passes, not forty.
        self.epochs, self.max_steps = epochs, max_steps
        self.batch_size, self.learning_rate = batch_size, learning_rate
        self.device = device

    @property
    def context(self) -> int:
        return self.seq_len

    def _positions(self, n: int) -> np.ndarray:
        """(n, seq_len): the rows making up each row's sequence, the first row standing in
        for the ones before the start."""
        return np.maximum(np.arange(n)[:, None] + np.arange(self.seq_len)[None, :] - (self.seq_len - 1), 0)

    def _sequences(self, X: np.ndarray) -> np.ndarray:
        return X[self._positions(len(X))]  # (n, seq_len, n_features)

    def _fit(self, X: np.ndarray, rows: np.ndarray) -> None:
        import torch

        torch.manual_seed(self.seed)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = _net(X.shape[1], self.hidden, self.latent).to(device)
        positions = self._positions(len(X))[rows]  # the sequences ending in a row to learn from
        seqs = torch.as_tensor(X[positions], dtype=torch.float32, device=device)
        # Held-out rows inside a sequence are read as context but never reconstructed: the
        # loss leaves them out, so the network is not taught the windows that validate it.
        weights = torch.as_tensor(rows[positions], dtype=torch.float32, device=device)[..., None]
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        gen = torch.Generator().manual_seed(self.seed)
        steps = 0
        for _ in range(self.epochs):
            for batch in torch.randperm(len(seqs), generator=gen).split(self.batch_size):
                x, w = seqs[batch.to(device)], weights[batch.to(device)]
                loss = torch.sum((net(x) - x) ** 2 * w) / (torch.sum(w) * x.shape[-1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if steps >= self.max_steps:
                    break
            if steps >= self.max_steps:
                break
        self.net_ = net.to("cpu").eval()
        self.error_scale_ = np.maximum(self._squared_errors(X)[rows].mean(axis=0), ERROR_FLOOR**2)

    def _squared_errors(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(self._sequences(X), dtype=torch.float32)
            return ((self.net_(x) - x)[:, -1, :] ** 2).double().numpy()

    def _errors(self, X: np.ndarray) -> np.ndarray:
        return self._squared_errors(X) / self.error_scale_

    def _score(self, X: np.ndarray) -> np.ndarray:
        return self._errors(X).mean(axis=1)

    def _parts(self, X: np.ndarray) -> np.ndarray:
        return self._errors(X)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "seq_len": self.seq_len, "hidden": self.hidden, "latent": self.latent,
                "epochs": self.epochs, "max_steps": self.max_steps, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate,
                "device": self.device}

    def _get_fitted(self) -> Any:
        import torch

        buf = io.BytesIO()
        torch.save(self.net_.state_dict(), buf)
        return {"n_features": self.net_.n_features, "weights": buf.getvalue(), "error_scale": self.error_scale_}

    def _set_fitted(self, fitted: Any) -> None:
        import torch

        net = _net(int(fitted["n_features"]), self.hidden, self.latent)
        net.load_state_dict(torch.load(io.BytesIO(fitted["weights"]), map_location="cpu", weights_only=True))
        self.net_ = net.eval()
        self.error_scale_ = np.asarray(fitted["error_scale"], dtype=np.float64)


def _net(n_features: int, hidden: int, latent: int) -> Any:
    """The autoencoder's network (built here so torch is imported only when it is used)."""
    import torch
    from torch import nn

    class GRUAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n_features = n_features
            self.encoder = nn.GRU(n_features, hidden, batch_first=True)
            self.to_code = nn.Linear(hidden, latent)
            self.decoder = nn.GRU(latent, hidden, batch_first=True)
            self.to_features = nn.Linear(hidden, n_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, h = self.encoder(x)  # h: (1, batch, hidden)
            code = torch.tanh(self.to_code(h[-1]))
            out, _ = self.decoder(code.unsqueeze(1).expand(-1, x.shape[1], -1))
            return self.to_features(out)

    return GRUAutoencoder()


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (RecurrentAutoencoder, IsolationForestDetector, PCADetector)}
DEFAULT_DETECTOR = RecurrentAutoencoder.name


def make(name: str, **params: Any) -> Detector:
    """A new detector by name (``gru_ae``, ``iforest``, ``pca``)."""
    if name not in DETECTORS:
        raise ValueError(f"no detector {name!r}: choose one of {', '.join(DETECTORS)}")
    return DETECTORS[name](**params)
