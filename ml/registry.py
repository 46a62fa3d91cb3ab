"""The model registry: numbered versions of the mesh's model, one of them current.

Layout under the registry folder (by default ``<data dir>/models``)::

    v0001/manifest.json     what the version is: detector, parameters, features, the
                            training range, per service its threshold, validation
                            figures, normaliser and the SHA-256 of its payload
    v0001/<service>.pkl     the fitted detector's state
    CURRENT                 the version the scorer uses ("v0001")

A version is written into a temporary folder and renamed into place, so a reader never
sees half of one.  Loading checks everything before anything is used: the manifest's
format, that its features are the ones this greymesh computes, that the detector kind
exists, and every payload's checksum; a failure is a :class:`ModelError` that names the
file and what to do, and the caller keeps the model it had.  Payloads are pickles, read
with an unpickler that admits an exact list of numpy and scikit-learn names, and the
folder is private to its user (0700, files 0600): a model file is code-adjacent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ml.detectors import DETECTORS
from ml.features import NAMES, Normaliser
from ml.model import MeshModel, ServiceModel

FORMAT = 1
_VERSION = re.compile(r"v(\d{4,})")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ModelError(Exception):
    """A model version could not be saved or loaded; the message names the file and the fix."""


class _SafeUnpickler(pickle.Unpickler):
    """Admits exactly the globals a detector's state pickles to, nothing by prefix: a
    dotted name under an admitted module (``sklearn`` + ``os.system``) reaches anything
    that module imported.  A detector whose state needs another global adds it here, with
    the test that trains it (tests/test_ml.py)."""

    ALLOWED = frozenset({
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy._core.numeric", "_frombuffer"),            # contiguous arrays, pickle protocol 5
        ("numpy._core.multiarray", "_reconstruct"),        # arrays that are not contiguous
        ("sklearn.ensemble._iforest", "IsolationForest"),  # iforest: the fitted estimator
        ("sklearn.tree._classes", "ExtraTreeRegressor"),
        ("sklearn.tree._tree", "Tree"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model file")


class Registry:
    def __init__(self, root: Path):
        self.root = root

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if _VERSION.fullmatch(p.name)),
                      key=lambda v: int(v[1:]))

    def current(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def save(self, model: MeshModel, metrics: dict[str, Any] | None = None) -> str:
        """Store ``model`` as the next version and make it current; return its name."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self.versions()
        version = f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.root))
        services: dict[str, Any] = {}
        for name, sm in model.services.items():
            if not _SAFE_NAME.fullmatch(name):
                raise ModelError(f"service name {name!r} cannot name a model file")
            payload = pickle.dumps(sm.detector.get_state(), protocol=pickle.HIGHEST_PROTOCOL)
            path = tmp / f"{name}.pkl"
            path.write_bytes(payload)
            path.chmod(0o600)
            services[name] = {"file": path.name, "sha256": hashlib.sha256(payload).hexdigest(),
                              "threshold": sm.detector.threshold_, "validation": sm.detector.validation_,
                              "normaliser": sm.normaliser.to_dict()}
        manifest = {"format": FORMAT, "version": version, "created": time.time(), "detector": model.detector,
                    "params": model.params, "features": list(NAMES), "since": model.since, "until": model.until,
                    "services": services, "skipped": model.skipped, "metrics": metrics or {}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "manifest.json").chmod(0o600)
        tmp.chmod(0o700)
        os.rename(tmp, self.root / version)
        self._set_current(version)
        return version

    def manifest(self, version: str) -> dict[str, Any]:
        if not _VERSION.fullmatch(version):
            raise ModelError(f"{version!r} is not a model version (v0001, v0002, ...); `greymesh ml models` lists them")
        path = self.root / version / "manifest.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model version; `greymesh ml models` lists them") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable manifest ({exc}); roll back with `greymesh ml rollback` "
                             "or train again") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelError(f"{path}: manifest format {doc.get('format') if isinstance(doc, dict) else '?'} "
                             f"is not {FORMAT}, the one this greymesh reads; train again with `greymesh ml train`")
        return doc

    def load(self, version: str | None = None) -> tuple[str, MeshModel]:
        """The given version, or the current one, fully checked (see the module docstring)."""
        version = version or self.current()
        if version is None:
            raise ModelError(f"{self.root}: no model yet; train one with `greymesh ml train`")
        doc = self.manifest(version)
        path = self.root / version / "manifest.json"
        if doc.get("features") != list(NAMES):
            raise ModelError(f"{path}: trained on features {doc.get('features')}, but this greymesh computes "
                             f"{list(NAMES)}; train again with `greymesh ml train`")
        cls = DETECTORS.get(doc.get("detector", ""))
        if cls is None:
            raise ModelError(f"{path}: unknown detector {doc.get('detector')!r} (known: {', '.join(DETECTORS)})")
        try:
            model = MeshModel(doc["detector"], dict(doc["params"]), int(doc["since"]), int(doc["until"]),
                              skipped=dict(doc.get("skipped", {})))
            entries = [(name, self.root / version / Path(entry["file"]).name, entry)
                       for name, entry in dict(doc["services"]).items()]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: incomplete manifest ({type(exc).__name__}: {exc}); roll back with "
                             "`greymesh ml rollback` or train again") from None
        for name, file, entry in entries:
            try:
                payload = file.read_bytes()
            except OSError as exc:
                raise ModelError(f"{file}: cannot read ({exc.strerror}); roll back with `greymesh ml rollback`") \
                    from None
            if hashlib.sha256(payload).hexdigest() != entry.get("sha256"):
                raise ModelError(f"{file}: checksum does not match its manifest (the file is corrupt or was "
                                 "changed); roll back with `greymesh ml rollback` or train again")
            try:
                state = _SafeUnpickler(io.BytesIO(payload)).load()
                detector = cls.from_state(state)
                normaliser = Normaliser.from_dict(entry["normaliser"])
            except Exception as exc:  # noqa: BLE001 (any failure here means: this file is unusable)
                raise ModelError(f"{file}: not a usable {doc['detector']} model ({type(exc).__name__}: {exc}); "
                                 "roll back with `greymesh ml rollback` or train again") from None
            model.services[name] = ServiceModel(name, normaliser, detector)
        return version, model

    def rollback(self) -> str:
        """Make the version before the current one current; return its name."""
        versions, current = self.versions(), self.current()
        if current not in versions or versions.index(current) == 0:
            raise ModelError(f"{self.root}: no version before {current or 'none'} to roll back to")
        previous = versions[versions.index(current) - 1]
        self.load(previous)  # refuse to roll back onto a version that would not load
        self._set_current(previous)
        return previous

    def use(self, version: str) -> None:
        self.load(version)
        self._set_current(version)

    def _set_current(self, version: str) -> None:
        tmp = self.root / ".CURRENT.tmp"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.root / "CURRENT")

    def remove_partial(self) -> None:
        """Temporary folders left by a save that crashed."""
        for p in self.root.glob(".v*-*"):
            shutil.rmtree(p, ignore_errors=True)
