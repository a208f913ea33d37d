"""Interventions: a short rule at a layer path changes what a Linen network computes.

As davidbau/dissect's `nethook.edit_layer(layer, rule)`: `intervene(model,
{path_or_alias: rule})` is `model` with each named module's output rewritten by
its rule, through `flax.linen.intercept_methods`. The rules act on the last
(channel) axis of the output, so a [b, h, w, K] map, a [b, K] vector or a
[b, n, K] token layout are all the same to them:

- `Rotate(matrix)`: y -> y @ matrix; the rest of the network sees rotated units.
- `Fold(matrix)`: y -> y @ matrix for whoever watches the layer (a capture), and
  every module that takes that rotated array as an argument (or in a list, tuple or dict
  argument) gets y back
  (y @ matrix @ matrix^T), as if the inverse were folded into the next
  computation: the network's output is unchanged up to float rounding. Arrays
  are matched by identity, so a consumer that is no module (a `+` in the
  parent's code) still sees rotated units.
- `Ablate(units, value)`: the units of mask `units` ([K] bool) are set to zero
  (`value="zero"`) or to `value[k]` (a [K] vector, e.g. the units' means).
- Any other function of the output, `lambda y: ...`, is a rule too.

A module called several times (shared weights, the body of `nn.scan`) is rewritten at
every call, where a capture refuses it as ambiguous. A `Fold` whose rotated output no
module takes as an argument (a function such as `nn.relu` reads it, or a lifted
transform) cannot be undone: the network then runs on rotated units, and a warning says
so.

Rules are pytrees whose arrays are leaves: built inside a jitted or vmapped
function from its arguments, they are data, not constants, so one compilation
serves every matrix or mask and `jax.vmap` over a batch of unit masks gives the
effect of every single-unit ablation in one call.

Nesting with `jaxdissect.capture`: the outermost `intercept_methods` runs
first and its `next_fun` runs the inner ones, so a capture that should see the
rewritten output must be outside; `Intervened.apply` installs the rules inside
`base.apply`, hence inside any capture of the `Intervened` module.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect.preprocess import declared_input_spec

ZERO = "zero"


# --------------------------------------------------------------------------- the operations


def rotate(y: jax.Array, matrix: jax.Array) -> jax.Array:
    """y @ matrix over the last (unit) axis."""
    if y.shape[-1] != matrix.shape[0]:
        raise ValueError(
            f"a {matrix.shape[0]}-unit rotation cannot act on an output with {y.shape[-1]} channels"
        )
    return jnp.einsum("...k,kl->...l", y, matrix.astype(y.dtype))


def orthogonality_error(matrix: Any) -> float | None:
    """|v M M^T - v| / |v| over a few fixed random probes v: 0 for an orthogonal M (rows
    orthonormal: M M^T = I), in O(K^2) where M M^T would cost O(K^3). A stack [..., K, L]
    gives its worst matrix. None where there is nothing concrete to check: a tracer
    (inside jit or vmap), a matrix across hosts, or no numeric array of 2 or more dims."""
    if isinstance(matrix, jax.core.Tracer) or not getattr(matrix, "is_fully_addressable", True):
        return None
    if not isinstance(matrix, (np.ndarray, np.generic, jax.Array, list, tuple)):
        return None
    m = np.asarray(matrix)
    if (
        m.ndim < 2
        or not m.size
        or not (np.issubdtype(m.dtype, np.number) or m.dtype == jnp.bfloat16)
    ):
        return None
    m = m.astype(np.result_type(m.dtype, np.float32), copy=False)
    probes = np.random.default_rng(0).standard_normal((4, m.shape[-2])).astype(m.dtype)
    back = (probes @ m) @ np.swapaxes(m, -1, -2)
    return float(np.linalg.norm(back - probes, axis=(-2, -1)).max() / np.linalg.norm(probes))


def orthogonality_tolerance(dtype: Any) -> float:
    """The largest `orthogonality_error` a rotation stored in `dtype` may show: 1e-3 for
    float32 and wider (rounding gives about 1e-7, float32 QR about 1e-6), 8 eps below."""
    dtype = np.dtype(dtype)
    eps = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
    return max(1e-3, 8 * eps)


def unrotate(rotated: jax.Array, matrix: jax.Array) -> jax.Array:
    """rotated @ matrix^T: undoes `rotate` for an orthogonal matrix."""
    return jnp.einsum("...l,kl->...k", rotated, matrix.astype(rotated.dtype))


def ablate(y: jax.Array, units: jax.Array, value: jax.Array | str = ZERO) -> jax.Array:
    """y with the units of mask `units` ([K]) replaced by 0 (`value="zero"`) or `value` ([K])."""
    k = y.shape[-1]
    mask = jnp.asarray(units)
    if mask.shape != (k,):
        raise ValueError(
            f"Ablate(units=...) has shape {tuple(mask.shape)}; it must be a mask of the layer's "
            f"{k} units (interventions.unit_mask({k}, indices))"
        )
    if mask.dtype != jnp.bool_:  # K unit numbers would pass for a mask of K units
        raise ValueError(
            f"Ablate(units=...) of dtype {mask.dtype}: it must be a bool mask of the layer's "
            f"{k} units (interventions.unit_mask({k}, indices) makes one from unit numbers)"
        )
    if isinstance(value, str):
        if value != ZERO:
            raise ValueError(f"Ablate(value={value!r}): use 'zero' or a [K] vector of values")
        return jnp.where(mask, jnp.zeros((), y.dtype), y)
    fill = jnp.asarray(value)
    if fill.shape != (k,):
        raise ValueError(
            f"Ablate(value=...) has shape {tuple(fill.shape)}; it must hold one value per unit ({k})"
        )
    return jnp.where(mask, fill.astype(y.dtype), y)


def unit_mask(num_units: int, units: Sequence[int] | np.ndarray) -> np.ndarray:
    """A bool [num_units] mask of the unit numbers `units` (for `Ablate`); a bool or float
    array is refused (a mask's True would be read as unit 1, 1.7 as unit 1)."""
    idx = np.asarray(units)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"units of dtype {idx.dtype}: give unit numbers (integers); a bool mask is "
            "already what Ablate takes"
        )
    idx = idx.astype(np.int64).reshape(-1)
    bad = idx[(idx < 0) | (idx >= num_units)]
    if bad.size:
        raise ValueError(f"units {bad.tolist()} outside 0..{num_units - 1}")
    mask = np.zeros(num_units, bool)
    mask[idx] = True
    return mask


# --------------------------------------------------------------------------- the rules


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Rotate:
    """The layer's output y becomes y @ matrix ([K, K]) for everything after it."""

    matrix: Any

    def __call__(self, y: jax.Array) -> jax.Array:
        return rotate(y, jnp.asarray(self.matrix))

    def tree_flatten(self) -> tuple[tuple[Any, ...], None]:
        return (self.matrix,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[Any]) -> Rotate:
        return cls(*children)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Fold:
    """Rotated by `matrix` at the layer, un-rotated for the modules that consume it.

    The inverse is `matrix`^T: a concrete matrix that is not orthogonal (rows orthonormal,
    `orthogonality_error`) is refused when the rule is made; a traced one (a jitted
    function's argument) is not checked. Rebuilding the pytree (`tree_unflatten`) checks
    nothing.
    """

    matrix: Any

    def __post_init__(self) -> None:
        error = orthogonality_error(self.matrix)
        if error is None:
            return
        dtype = getattr(self.matrix, "dtype", None)
        tolerance = orthogonality_tolerance(
            np.asarray(self.matrix).dtype if dtype is None else dtype
        )
        if not error <= tolerance:
            raise ValueError(
                f"Fold(matrix): matrix @ matrix.T is {error:.3g} (relative) from I, above "
                f"{tolerance:.0e}: Fold undoes the rotation with matrix.T, so it needs an "
                "orthogonal matrix; use Rotate for any other"
            )

    def __call__(self, y: jax.Array) -> jax.Array:
        return rotate(y, jnp.asarray(self.matrix))

    def undo(self, rotated: jax.Array) -> jax.Array:
        return unrotate(rotated, jnp.asarray(self.matrix))

    def tree_flatten(self) -> tuple[tuple[Any, ...], None]:
        return (self.matrix,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[Any]) -> Fold:
        fold = object.__new__(cls)  # no check: leaves may be tracers, placeholders, results
        object.__setattr__(fold, "matrix", children[0])
        return fold


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Ablate:
    """The units of mask `units` ([K] bool) set to zero, or to `value` ([K], e.g. their means)."""

    units: Any
    value: Any = ZERO

    def __call__(self, y: jax.Array) -> jax.Array:
        return ablate(y, self.units, self.value)

    def tree_flatten(self) -> tuple[tuple[Any, ...], str | None]:
        if isinstance(self.value, str):
            return (self.units,), self.value
        return (self.units, self.value), None

    @classmethod
    def tree_unflatten(cls, aux: str | None, children: Sequence[Any]) -> Ablate:
        return cls(children[0], aux) if aux is not None else cls(*children)


# A rule: a function of the layer's output (`Rotate`, `Fold`, `Ablate` or any other).
Rule = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- in the network


def module_path(module: nn.Module) -> str:
    """A Linen module's path, '/'-separated ('' for the root)."""
    return "/".join(str(p) for p in module.path)


def rule_paths(
    rules: Mapping[str, Rule], aliases: Mapping[str, str] | None = None
) -> dict[str, str]:
    """{module path: name as given} of `rules` keys (paths with '.' or '/', or aliases)."""
    aliases = dict(aliases or {})
    out: dict[str, str] = {}
    for name in rules:
        if name.startswith("re:"):
            raise ValueError(f"intervention at {name!r}: name a module path or an alias, not re:")
        if not callable(rules[name]):
            raise TypeError(
                f"intervention at {name!r}: a {type(rules[name]).__name__} is no rule; give "
                "Rotate, Fold, Ablate or a function of the layer's output"
            )
        path = aliases.get(name, name).replace(".", "/").strip("/")
        if path in out:
            raise ValueError(f"interventions at {out[path]!r} and {name!r} name one module")
        out[path] = name
    return out


@contextlib.contextmanager
def active(
    rules: Mapping[str, Rule], *, aliases: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Within the context, each Linen module named in `rules` has its `__call__` output rewritten.

    A module called several times is rewritten at every call. If modules ran in
    the context and a named one was not among them, leaving the context raises
    `capture.LayerNotFoundError` listing the modules that exist.
    """
    paths = rule_paths(rules, aliases)
    by_path = {path: rules[name] for path, name in paths.items()}
    seen: dict[str, tuple[int, ...]] = {}
    folded: list[tuple[jax.Array, Fold, str]] = []  # (rotated output, its rule, its name)
    undone: dict[int, jax.Array] = {}

    def unfold(value: Any) -> Any:
        for i, (rotated, rule, _) in enumerate(folded):
            if value is rotated:
                if i not in undone:
                    undone[i] = rule.undo(rotated)
                return undone[i]
        return value

    def unfold_tree(tree: Any) -> Any:
        # In a list, tuple or dict argument too; rebuilt only where a leaf is undone.
        leaves, treedef = jax.tree.flatten(tree)
        new = [unfold(leaf) for leaf in leaves]
        if all(a is b for a, b in zip(leaves, new, strict=True)):
            return tree
        return jax.tree.unflatten(treedef, new)

    def interceptor(next_fun, args, kwargs, context):
        if folded:
            args = tuple(unfold_tree(a) for a in args)
            kwargs = {k: unfold_tree(v) for k, v in kwargs.items()}
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = module_path(context.module)
            seen[path] = tuple(getattr(out, "shape", ())[1:])
            rule = by_path.get(path)
            if rule is not None:
                if not hasattr(out, "shape"):
                    raise ValueError(
                        f"intervention at {paths[path]!r}: the module returns "
                        f"{type(out).__name__}, not an array; name one of its submodules"
                    )
                try:
                    out = rule(out)
                except ValueError as e:
                    raise ValueError(f"intervention at {paths[path]!r}: {e}") from None
                if isinstance(rule, Fold):
                    folded.append((out, rule, paths[path]))
        return out

    with nn.intercept_methods(interceptor):
        yield
    for i, (_, _, name) in enumerate(folded):
        if i not in undone:
            logging.warning(
                "Fold at %r: no module took the rotated output as an argument (a function "
                "such as nn.relu, or a lifted transform, reads it), so the network runs on "
                "rotated units there, as under Rotate",
                name,
            )
    missing = [name for path, name in paths.items() if path not in seen]
    if seen and missing:
        from jaxdissect import capture

        capture.resolve_layers(missing, seen, aliases)  # raises, listing the layers
        raise capture.LayerNotFoundError(f"interventions at {missing} reached no module")


class Wrapped(nn.Module):
    """A model standing for `base`: its paths, aliases, default layers, input spec and
    `init` are `base`'s; subclasses define `apply`."""

    base: nn.Module

    @property
    def layer_aliases(self) -> Mapping[str, str] | None:
        return getattr(self.base, "layer_aliases", None)

    @property
    def default_layers(self) -> tuple[str, ...]:
        return tuple(getattr(self.base, "default_layers", ()) or ())

    @property
    def input_spec(self) -> Any:
        return declared_input_spec(self.base)

    def init(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.base.init(*args, **kwargs)


class Intervened(Wrapped):
    """`base` with `rules` applied, for `apply`, `capture` and `pipeline` like any Linen model.

    `apply` runs `base.apply` inside `active(rules)`, so inside any interceptor its
    caller installed (a capture sees the rewritten outputs).
    """

    rules: Mapping[str, Rule]

    def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        with active(self.rules, aliases=self.layer_aliases):
            return self.base.apply(variables, *args, **kwargs)


def intervene(model: nn.Module, rules: Mapping[str, Rule]) -> Intervened:
    """`model` with each rule of `{path_or_alias: rule}` applied at its module's output.

    Build it inside the function that is jitted or vmapped, from that
    function's arguments, for the rules' arrays to be data:

        @jax.jit
        def effects(variables, images, masks):  # masks: [n, K] bool
            one = lambda m: intervene(model, {"conv5": Ablate(m)}).apply(variables, images)
            return jax.vmap(one)(masks)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"intervene needs a flax.linen Module, got {type(model).__name__} "
            "(NNX modules and plain functions have no method interceptors)"
        )
    # parent=None: a top-level wrapper, also when built inside another module's method.
    return Intervened(model, dict(rules), parent=None)
