"""Recompute ``fingerprint.pb`` with TensorFlow (optional: the rewrite drops the stale one by default).

TensorFlow's fingerprint hashes the parsed graph, so recomputing it means loading the whole proto: slow and
memory-hungry for large models, which is why it is opt-in (``--recompute-fingerprint``, extra ``tf``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import RewriteError


def write_fingerprint(model_dir: Path) -> None:
    try:
        from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
    except ImportError as exc:
        raise RewriteError(
            f"--recompute-fingerprint needs TensorFlow (pip install 'neuron-model-operator[tf]'): {exc}"
        ) from None
    (model_dir / "fingerprint.pb").write_bytes(fingerprinting.CreateFingerprintDef(str(model_dir)))
