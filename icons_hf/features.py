"""Feature types and projections: what the gradient stage can make of a per-example gradient.

Two registries in the style of :mod:`icons_hf.specialists` and :mod:`icons_hf.rules`; each entry is one decorated
class and carries what its callers ask instead of comparing names:

* a **feature type** (:func:`feature_type`) maps a batch of per-example gradients of one parameter to features
  (``"sgd"``: the gradient; ``"adam"``: the LESS map of the checkpoint's Adam state). Its entry says whether it
  ``needs_optimizer_state`` and describes itself in one line (settings help, CLI help, card, report);
* a **projection** (:func:`projection`) accumulates a parameter's (featurised) gradients into one row of ``dim``
  values (``"countsketch"``, ``"rademacher"``, ``"identity"``). Its entry says whether it ``uses_dim``.

Adding one::

    @feature_type("sign", description="the sign of each gradient coordinate")
    class Sign:
        def __init__(self, *, state, settings, device): ...
        def describe(self) -> dict: return {}
        def __call__(self, name, grads): return grads.sign()

after which ``FeatureSettings(train_feature="sign")``, ``icons-hf gradients --feature sign`` and the card accept
and describe it. A projection class is built with ``(seed=, shapes=, dim=, device=)`` and has ``dim``,
``describe()`` and ``accumulate(out, name, grads)``.

The built-in entries (formulas):

* ``adam`` with ``adam_variant="less"`` (the map of the released LESS code, used by ICONS):
  ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, feature ``m' / sqrt(v' + eps)``; with
  ``adam_variant="torch"`` (the update ``torch.optim.AdamW`` would take next), with ``t = step + 1``,
  ``m_hat = m' / (1 - b1^t)``, ``v_hat = v' / (1 - b2^t)``, feature ``m_hat / (sqrt(v_hat) + eps)``. ``m``,
  ``v`` and ``step`` are read from the checkpoint's optimizer state, never written.
* Every projection is fixed by ``(kind, seed, parameter name, dim)`` alone: the same coordinate of the same
  parameter lands in the same place on any device, in any batch and in any process. ``countsketch`` sends each
  coordinate to one signed bucket, bucket and sign from a stateless 64-bit hash of ``(seed, parameter name,
  coordinate)``; ``rademacher`` is a dense matrix of ``+-1/sqrt(dim)`` entries per parameter (a
  Johnson-Lindenstrauss projection as in TRAK/LESS), its signs the bits of a SplitMix64 hash (``numel x dim``
  float32 values per parameter: it suits small parameter counts); ``identity`` keeps the flat gradient of the
  trainable parameters in ``model.named_parameters()`` order (``dim`` is their total size).

Accuracy of the projections (``benchmarks/extract.py``, dim 8192, 65,536 LoRA coordinates): the Spearman rank
correlation between projected and exact cosine similarities over all pairs of rows was 0.998 for both with
Adam-LESS features and 0.993 (countsketch) / 0.991 (rademacher) with SGD features; both preserve inner products in
expectation with a cosine error of order ``sqrt(2 / dim)``, countsketch at a fraction of the cost.

torch is imported where a tensor is built, so that reading the registries (the settings, ``icons-hf --help``)
does not load it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureType:
    """A registered feature type: its class (built with ``state=``, ``settings=``, ``device=``), whether it needs
    the checkpoint's optimizer state, and its one-line description."""

    name: str
    build: Callable
    needs_optimizer_state: bool
    description: str


@dataclass(frozen=True)
class Projection:
    """A registered projection: its class (built with ``seed=``, ``shapes=``, ``dim=``, ``device=``), whether the
    ``dim`` setting applies to it, and its one-line description."""

    name: str
    build: Callable
    uses_dim: bool
    description: str


FEATURE_TYPES: dict[str, FeatureType] = {}
PROJECTIONS: dict[str, Projection] = {}


def feature_type(name: str, *, description: str, needs_optimizer_state: bool = False):
    """Registers a feature type (see the module docstring)."""

    def register(cls):
        if name in FEATURE_TYPES:
            raise ValueError(f"a feature type named {name!r} is already registered.")
        FEATURE_TYPES[name] = FeatureType(name, cls, needs_optimizer_state, description)
        return cls

    return register


def projection(name: str, *, description: str, uses_dim: bool = True):
    """Registers a projection (see the module docstring)."""

    def register(cls):
        if name in PROJECTIONS:
            raise ValueError(f"a projection named {name!r} is already registered.")
        PROJECTIONS[name] = Projection(name, cls, uses_dim, description)
        return cls

    return register


def describe_features(feature: str | None, projection_name: str | None) -> str:
    """One sentence naming a store's feature type and projection with their registry descriptions (names that are
    not registered here are named only)."""
    parts = []
    for kind, name, registry in (("feature", feature, FEATURE_TYPES), ("projection", projection_name, PROJECTIONS)):
        if name is not None:
            entry = registry.get(name)
            parts.append(f"{kind} `{name}`" + (f" ({entry.description})" if entry else ""))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- feature types


@feature_type("sgd", description="plain per-example gradients (the released ICONS scripts; validation rows always)")
class Gradient:
    """The gradient itself."""

    def __init__(self, *, state=None, settings=None, device=None):
        pass

    def describe(self) -> dict:
        return {}

    def __call__(self, name: str, grads):
        return grads


@feature_type("adam", needs_optimizer_state=True,
              description="the LESS map of the checkpoint's Adam state, as the ICONS/LESS papers (pool rows)")
class AdamFeature:
    """``adam_variant`` ``"less"`` or ``"torch"`` (module docstring) of a read-only ``AdamState``."""

    def __init__(self, *, state, settings, device):
        self.state = state
        self.adam_variant = settings.adam_variant
        self.device = device
        self._moments: dict[str, tuple] = {}

    def describe(self) -> dict:
        return {"adam_variant": self.adam_variant, "betas": list(self.state.betas), "eps": self.state.eps}

    def _get(self, name):
        """Per-parameter constants ``(a, c, alpha, value, eps_out)`` on the compute device, so that the feature is
        ``(a + alpha * g) / (sqrt(c + value * g^2) + eps_out)``: for ``less``, ``a = b1 m``, ``c = b2 v + eps``,
        ``alpha = 1 - b1``, ``value = 1 - b2``, ``eps_out = 0``; for ``torch`` the bias corrections are folded in
        and ``eps_out = eps``. Built once from float32 copies: the optimizer's own tensors are never touched."""
        import torch

        if name not in self._moments:
            st = self.state.moments[name]
            m = st["exp_avg"].detach().to(self.device, torch.float32, copy=True).reshape(-1)
            v = st["exp_avg_sq"].detach().to(self.device, torch.float32, copy=True).reshape(-1)
            b1, b2 = self.state.betas
            eps = self.state.eps
            if self.adam_variant == "less":
                self._moments[name] = (m.mul_(b1), v.mul_(b2).add_(eps), 1.0 - b1, 1.0 - b2, 0.0)
            else:
                t = int(st.get("step", 0)) + 1
                c1, c2 = 1.0 - b1**t, 1.0 - b2**t
                self._moments[name] = (m.mul_(b1 / c1), v.mul_(b2 / c2), (1.0 - b1) / c1, (1.0 - b2) / c2, eps)
        return self._moments[name]

    def __call__(self, name: str, grads):
        a, c, alpha, value, eps_out = self._get(name)
        denominator = c.addcmul(grads, grads, value=value).sqrt_()
        if eps_out:
            denominator.add_(eps_out)
        return a.add(grads, alpha=alpha).div_(denominator)


# --------------------------------------------------------------------------------------------- projections


def parameter_key(seed: int, name: str) -> int:
    """A 64-bit key derived from the seed and the parameter name (stable across Python runs)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def countsketch_hash(seed: int, name: str, numel: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets (int64 in ``[0, dim)``) and signs (+-1 float32) for each coordinate of one parameter."""
    key = np.uint64(parameter_key(seed, name))
    buckets = np.empty(numel, dtype=np.int64)
    signs = np.empty(numel, dtype=np.float32)
    chunk = 1 << 22
    for start in range(0, numel, chunk):
        coords = np.arange(start, min(numel, start + chunk), dtype=np.uint64)
        with np.errstate(over="ignore"):
            h = _splitmix64(coords ^ key)
        buckets[start : start + len(coords)] = ((h >> np.uint64(1)) % np.uint64(dim)).astype(np.int64)
        signs[start : start + len(coords)] = np.where((h & np.uint64(1)) == 1, 1.0, -1.0)
    return buckets, signs


def rademacher_signs(seed: int, name: str, numel: int, dim: int) -> np.ndarray:
    """The dense ``numel x dim`` matrix of +-1 (float32) of one parameter (unscaled).

    Row ``c`` holds the bits of ``ceil(dim / 64)`` consecutive SplitMix64 hashes of ``c * ceil(dim / 64) + k``
    keyed by ``(seed, parameter name)``, least significant bit first: a stateless function of its inputs, so the
    matrix is the same for every torch version and device, and is cheap to build (no random number stream)."""
    key = np.uint64(parameter_key(seed, f"{name}\x00rademacher"))
    words = -(-dim // 64)
    out = np.empty((numel, dim), dtype=np.float32)
    chunk = max(1, (1 << 22) // words)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        counters = np.arange(start * words, stop * words, dtype=np.uint64)
        with np.errstate(over="ignore"):
            h = _splitmix64(counters ^ key)
        bits = np.unpackbits(h.astype("<u8").view(np.uint8), bitorder="little").reshape(stop - start, words * 64)
        out[start:stop] = bits[:, :dim]
    out *= 2.0
    out -= 1.0
    return out


class _Hashed:
    """What the hashed projections share: one table per parameter, built on first use on the compute device."""

    def __init__(self, *, seed: int, shapes: Mapping[str, int], dim: int, device=None):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim={dim!r} must be a positive integer.")
        self.seed, self.shapes, self.dim, self.device = int(seed), dict(shapes), int(dim), device
        self._cache: dict[str, tuple] = {}

    def describe(self) -> dict:
        return {}

    def tables(self, name: str) -> tuple:
        import torch

        if name not in self._cache:
            arrays = self.build_tables(name, self.shapes[name])
            self._cache[name] = tuple(torch.from_numpy(a).to(self.device) for a in arrays)
        return self._cache[name]


@projection("countsketch", description="hashed signed buckets: any device, one scatter-add per parameter")
class CountSketch(_Hashed):
    def build_tables(self, name: str, numel: int) -> tuple:
        return countsketch_hash(self.seed, name, numel, self.dim)

    def accumulate(self, out, name: str, grads) -> None:
        buckets, signs = self.tables(name)
        out.index_add_(1, buckets, grads * signs)


@projection("rademacher", description="dense +-1/sqrt(dim) matrix (TRAK-style); for small parameter counts")
class Rademacher(_Hashed):
    def build_tables(self, name: str, numel: int) -> tuple:
        return (rademacher_signs(self.seed, name, numel, self.dim),)

    def describe(self) -> dict:
        return {"signs": "splitmix64-bits"}  # how the matrix is generated (see rademacher_signs)

    def accumulate(self, out, name: str, grads) -> None:
        (signs,) = self.tables(name)
        out.addmm_(grads, signs, alpha=1.0 / float(np.sqrt(self.dim)))


@projection("identity", uses_dim=False, description="no projection: the flat gradient (dim = parameter count)")
class Identity:
    def __init__(self, *, seed: int, shapes: Mapping[str, int], dim=None, device=None):
        self.offsets, offset = {}, 0
        for name, numel in shapes.items():
            self.offsets[name] = offset
            offset += numel
        self.dim = offset

    def describe(self) -> dict:
        return {}

    def accumulate(self, out, name: str, grads) -> None:
        start = self.offsets[name]
        out[:, start : start + grads.shape[1]] += grads


__all__ = [
    "FEATURE_TYPES", "PROJECTIONS", "FeatureType", "Projection", "countsketch_hash", "describe_features",
    "feature_type", "parameter_key", "projection", "rademacher_signs",
]
