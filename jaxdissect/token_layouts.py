"""A layer's [B, tokens, C] output read as a map: its `TokenLayout`, named, declared or inferred.

A layer whose output is [B, tokens, C] (a Vision Transformer block, its MLP's
hidden layer) is read through a `TokenLayout`: its patch tokens, row-major on
an h x w grid, become the [B, h, w, C] map, and the class and register tokens
around them are dropped. The layout is the one the caller names
(`token_layout="1+14x14"`), else the model's own (`model.token_layout(input_shape)`, or a
`token_layout` attribute holding a layout or its text),
else inferred: from `model.patch_size` (grid = input // patch), or from the token
count alone (the grid of the input's aspect ratio with the fewest extra tokens, at
most `MAX_EXTRA_TOKENS`); one extra token is a class token before the patches, and
more need a named layout (registers may come before or after the patches). A named
layout must agree with the model's own and with its patch grid. A model with a
`patch_size` refuses an input whose sides are not multiples of it (`preprocess.patch_grid`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from jaxdissect.preprocess import TokenLayout, patch_grid, patch_pair


class LayerNotFoundError(ValueError):
    """A requested layer does not exist in the model."""


# Extra (class, register) tokens that the token-count inference accepts before the patches.
MAX_EXTRA_TOKENS = 16
# Tokens before the patches that a refusal lists grids for: none, a class token, a class
# token and 4 registers (timm's and DINOv2's register models).
GUESSED_PREFIXES = (0, 1, 5)
# The longest side of a listed grid is at most this many times its shortest.
MAX_GRID_ASPECT = 4


def infer_token_layout(
    name: str,
    tokens: int,
    input_shape: Sequence[int],
    *,
    patch_size: int | Sequence[int] | None = None,
) -> TokenLayout:
    """The layout of a [B, `tokens`, C] output of layer `name` for one input of `input_shape`.

    With `patch_size`, the grid is the input's size over it; without, the grid of the
    input's aspect ratio with the fewest extra tokens (at most `MAX_EXTRA_TOKENS`). One
    extra token is a class token before the patches; more are refused, as nothing says
    which of them (registers) come before the patches and which after.
    """
    height, width = int(input_shape[0]), int(input_shape[1])
    advice = "name the layout, e.g. token_layout='1+14x14' (class token, then 14x14 patches)"
    if patch_size is not None:
        ph, pw = patch_pair(patch_size)
        grid = patch_grid(input_shape, patch_size)
        extra = tokens - grid[0] * grid[1]
        if extra < 0:
            raise LayerNotFoundError(
                f"layer {name!r} has {tokens} tokens, fewer than the {grid[0]}x{grid[1]} patches "
                f"of a {height}x{width} input at patch size {ph}x{pw}; {advice}"
            )
        return _one_extra_at_most(name, tokens, grid, extra, grid_known=True)
    for extra in range(min(MAX_EXTRA_TOKENS, tokens - 1) + 1):
        n = tokens - extra
        for h in range(1, n + 1):
            if n % h == 0 and h * width == (n // h) * height:
                return _one_extra_at_most(name, tokens, (h, n // h), extra, grid_known=False)
    raise LayerNotFoundError(
        f"layer {name!r} has {tokens} tokens, which fit no patch grid of a {height}x{width} "
        f"input (the input's aspect ratio, after at most {MAX_EXTRA_TOKENS} class/register "
        f"tokens); {advice}"
    )


def _one_extra_at_most(
    name: str, tokens: int, grid: tuple[int, int], extra: int, *, grid_known: bool
) -> TokenLayout:
    """The patches with a class token before them, or none; more extra tokens are refused.

    `grid_known`: the grid is the model's patch size's; else only the input's shape
    suggests it, and grids of other shapes are named beside it.
    """
    if extra <= 1:
        return TokenLayout(grid, prefix=extra)
    h, w = grid
    places = (
        f"'{extra}+{h}x{w}' (all before, as timm's and DINOv2's class and register tokens) or "
        f"'1+{h}x{w}+{extra - 1}' (registers after the patches)"
    )
    if grid_known:
        raise LayerNotFoundError(
            f"layer {name!r} has {tokens} tokens: {h}x{w} patches and {extra} others, which "
            f"may come before or after the patches; name the layout, e.g. token_layout={places}"
        )
    others = [
        str(TokenLayout((a, n // a), prefix))
        for prefix in GUESSED_PREFIXES
        if (n := tokens - prefix) > 0
        for a in range(1, n + 1)
        if n % a == 0
        and max(a, n // a) <= MAX_GRID_ASPECT * min(a, n // a)
        and (prefix, a, n // a) != (extra, h, w)
    ]
    shapes = f", e.g. {', '.join(map(repr, others))}" if others else ""
    raise LayerNotFoundError(
        f"layer {name!r} has {tokens} tokens and the model declares no patch_size, so which "
        f"are patches is unknown: {h}x{w} patches (the input's shape) and {extra} others, "
        f"{places}; or a grid of another shape (patches that are not square){shapes}; name "
        "the layout, token_layout='[prefix+]HxW[+suffix]', or declare the model's patch_size"
    )


def refuse_split_heads(
    name: str, shape: Sequence[int], input_shape: Sequence[int], patch_size: Any
) -> None:
    """Refuse a [tokens, heads, head_dim] output, which would pass for an [h, w, C] map."""
    if patch_size is None or len(shape) != 3:
        return
    grid = patch_grid(input_shape, patch_size)
    patches = grid[0] * grid[1]
    if patches <= shape[0] <= patches + MAX_EXTRA_TOKENS and shape[0] != grid[0]:
        raise LayerNotFoundError(
            f"layer {name!r} has output {list(shape)}: [tokens, heads, head_dim], not a map; "
            "capture the attention module's output or an MLP layer instead"
        )


LayoutArg = TokenLayout | str | Mapping[str, "TokenLayout | str"] | None


def layouts_of(
    model: Any,
    named: Sequence[tuple[str, str]],
    available: Mapping[str, tuple[int, ...]],
    input_shape: Sequence[int],
    token_layout: LayoutArg,
) -> dict[str, TokenLayout]:
    """path -> layout of every requested layer whose per-example output is (tokens, C).

    A named layout must agree with what the model declares about its tokens: its own
    layout (`model.token_layout(input_shape)`) where that covers as many tokens, and the
    patch grid of `model.patch_size` where the tokens are that grid's and a few more. Each
    layer's layout, and where it came from, is logged.
    """
    as_layout = lambda v: v if isinstance(v, TokenLayout) else TokenLayout.parse(v)  # noqa: E731
    by_layer: dict[str, TokenLayout] = {}
    common: TokenLayout | None = None
    if isinstance(token_layout, Mapping):
        by_layer = {k.replace(".", "/").strip("/"): as_layout(v) for k, v in token_layout.items()}
        known = {n.replace(".", "/") for n, _ in named} | {p for _, p in named}
        unknown = sorted(set(by_layer) - known)
        if unknown:
            raise LayerNotFoundError(
                f"token_layout names layers that were not requested: {', '.join(unknown)}"
            )
    elif token_layout is not None:
        common = as_layout(token_layout)
    model_layout = getattr(model, "token_layout", None)
    patch_size = getattr(model, "patch_size", None)
    if patch_size is not None:  # the input must be whole patches, whichever layers are read
        patch_grid(input_shape, patch_size)
    declared: TokenLayout | None = None
    if model_layout is not None:  # a method of the input shape, or a fixed attribute
        call = callable(model_layout) and not isinstance(model_layout, TokenLayout)
        got = model_layout(tuple(input_shape)) if call else model_layout
        try:
            declared = as_layout(got)
        except (TypeError, ValueError) as e:
            what = f"token_layout({tuple(input_shape)}) gave" if call else "token_layout is"
            raise LayerNotFoundError(
                f"the model's {what} {got!r}: expected a TokenLayout or its text, e.g. "
                f"'1+14x14' ({e})"
            ) from None
    if common is not None and all(len(available[p]) != 2 for _, p in named):
        raise LayerNotFoundError(
            f"token_layout={str(common)!r}: none of the layers "
            f"{', '.join(n for n, _ in named)} has a [tokens, channels] output to read with it; "
            "leave token_layout out"
        )
    layouts: dict[str, TokenLayout] = {}
    for name, path in named:
        shape = available[path]
        layout = by_layer.get(path, by_layer.get(name.replace(".", "/"), common))
        if len(shape) != 2:
            if path in by_layer or name.replace(".", "/") in by_layer:
                raise LayerNotFoundError(
                    f"token_layout for layer {name!r}: its output {list(shape)} is not "
                    "[tokens, channels]"
                )
            refuse_split_heads(name, shape, input_shape, patch_size)
            continue
        tokens = shape[0]
        if layout is not None:
            origin = "as named"
            _check_named_layout(name, tokens, layout, declared, input_shape, patch_size)
        elif declared is not None:
            layout, origin = declared, "the model's token_layout"
        else:
            layout = infer_token_layout(name, tokens, input_shape, patch_size=patch_size)
            origin = "inferred from " + (
                "the model's patch_size" if patch_size is not None else "the token count"
            )
        if layout.tokens != tokens:
            raise LayerNotFoundError(
                f"layer {name!r} has {tokens} tokens, token_layout={str(layout)!r} covers "
                f"{layout.tokens}; name a layout of {tokens} tokens (prefix + h*w + suffix)"
            )
        if origin.startswith("inferred") and layout.prefix:
            logging.warning(
                "layer %s: its %d tokens read as %s (%s: the extra token taken for a class "
                "token before the patches); name token_layout if it is not",
                name,
                tokens,
                layout,
                origin,
            )
        else:
            logging.info("layer %s: its %d tokens read as %s (%s)", name, tokens, layout, origin)
        layouts[path] = layout
    return layouts


def _check_named_layout(
    name: str,
    tokens: int,
    layout: TokenLayout,
    declared: TokenLayout | None,
    input_shape: Sequence[int],
    patch_size: Any,
) -> None:
    """Refuse a named layout that contradicts what the model declares about its tokens."""
    if declared is not None and declared.tokens == tokens and declared != layout:
        raise LayerNotFoundError(
            f"layer {name!r}: token_layout={str(layout)!r} contradicts the model's own layout "
            f"{str(declared)!r} (its token_layout); leave token_layout out"
        )
    if patch_size is None:
        return
    ph, pw = patch_pair(patch_size)
    grid = patch_grid(input_shape, patch_size)
    patches = grid[0] * grid[1]
    if patches <= tokens <= patches + MAX_EXTRA_TOKENS and layout.grid != grid:
        raise LayerNotFoundError(
            f"layer {name!r}: token_layout={str(layout)!r} has a {layout.grid[0]}x"
            f"{layout.grid[1]} grid, but the model's patch_size {ph}x{pw} gives {grid[0]}x"
            f"{grid[1]} patches of a {input_shape[0]}x{input_shape[1]} input; name a layout "
            f"with that grid, e.g. {str(TokenLayout(grid, tokens - patches))!r}"
        )
