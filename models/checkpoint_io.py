"""The weights in a PyTorch or safetensors file, as numpy arrays, without torch and without
running code: which format a file is, and the state dict in it.

Formats: torch.save's zip and legacy `.pth` (`torch_file`, whose restricted unpickler
imports no global a state dict does not need: a whole pickled module is read as data, as
its state dict), `.safetensors` (`safetensors_file`); `.npz` is `npz_file.load_npz`. Every
error names the file (`weight_file`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxdissect.models import safetensors_file, torch_file
from jaxdissect.models.torch_import import WeightMappingError, strip_prefix
from jaxdissect.models.weight_file import (
    COPY_AGAIN,
    CheckpointError,
    UnsafeCheckpointError,
    check_readable,
)

# Keys under which training scripts nest the state dict (CSAIL Places365 and Lightning:
# 'state_dict'; torchvision's reference scripts and DeiT: 'model').
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class SelectionError(ValueError):
    """A selection (`entry`, `prefix`, `drop`) that names nothing in the weight file; the
    message starts with the parameter's name."""


def _named(err: CheckpointError, path: str) -> CheckpointError:
    """`err` with its message starting with `path` (errors met inside a pickle lack it)."""
    if str(err).startswith(f"{path}: "):
        return err
    if isinstance(err, UnsafeCheckpointError):
        return UnsafeCheckpointError(err.global_name, f"{path}: {err}")
    return CheckpointError(f"{path}: {err}")


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Everything a torch or safetensors weight file holds, tensors as numpy arrays.

    Unlike `load_state_dict`, wrappers such as `{'epoch': ..., 'state_dict': ...}`
    are returned as they are; an `argparse.Namespace` comes back as a `torch_file.Namespace`,
    a pickled `nn.Module` as its state dict (`torch_file.ModuleWeights`), and any other
    pickled object as an inert `torch_file.PickledObject` (nothing imported or run).

    Raises:
      UnsafeCheckpointError: a pickle that names a global outside
        `torch_file.ALLOWED_GLOBALS` and cannot be read.
      CheckpointError: the file is missing, not a readable weight file, truncated or
        corrupt (each message starts with the path).
    """
    path = os.fspath(path)
    check_readable(path)
    if safetensors_file.is_safetensors(path):
        return safetensors_file.load_safetensors(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: is empty; copy or download it again")
    with open(path, "rb") as file:
        zip_header = file.read(4) == b"PK\x03\x04"
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as err:  # an end record zipfile refuses (a multi-disk one)
        raise CheckpointError(f"{path}: {COPY_AGAIN} ({err})") from None
    if zip_header and not is_zip:  # a zip's directory is at its end: the end is missing
        raise CheckpointError(f"{path}: a zip file without its directory; {COPY_AGAIN}")
    loader: Callable[[str, str], Any] = torch_file.load_zip if is_zip else torch_file.load_legacy
    try:
        try:
            return loader(path, "utf-8")
        except UnicodeDecodeError:
            # Python 2 pickles hold byte strings; torch's own advice for them is latin1.
            return loader(path, "latin1")
    except RecursionError as err:  # a crafted self-referential container
        raise CheckpointError(f"{path}: nested too deeply to be a state dict") from err
    except CheckpointError as err:
        raise _named(err, path) from None
    # A record's bytes fail their CRC, the zip's offsets point outside the file, or its
    # entries ask for a zip version zipfile does not read (NotImplementedError).
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
        raise CheckpointError(f"{path}: {COPY_AGAIN} ({err})") from None
    except (  # crafted contents that reach past the checks above
        KeyError,
        AttributeError,
        TypeError,
        ValueError,
        OverflowError,
        IndexError,
        RuntimeError,
        MemoryError,
    ) as err:
        raise CheckpointError(
            f"{path}: not a state dict this reader takes ({type(err).__name__}: {err})"
        ) from err


def _tensor_dicts(obj: Mapping[str, Any]) -> list[str]:
    """The keys of `obj` whose values are state dicts (mappings of tensors only); a mapping
    under many keys (the pickle shares it) is looked through once."""
    seen: dict[int, bool] = {}

    def tensors_only(v: Any) -> bool:
        if id(v) not in seen:
            seen[id(v)] = bool(v) and all(isinstance(t, np.ndarray) for t in v.values())
        return seen[id(v)]

    return [str(k) for k, v in obj.items() if isinstance(v, Mapping) and tensors_only(v)]


def _state_dict_of(obj: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The state dict in `obj`: itself, or the one mapping under a `WRAPPER_KEYS` key (the
    other state dicts beside it, an EMA's, named in the log)."""
    if all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if len(wrapped) > 1:
        raise CheckpointError(
            f"{path}: weights under several keys {wrapped}; save the ones to dissect alone: "
            f"torch.save(checkpoint[{wrapped[0]!r}], path)"
        )
    if wrapped:
        if others := [k for k in _tensor_dicts(obj) if k != wrapped[0]]:
            logging.info(
                "%s: the weights under %r are read; beside them, state dicts under %s (to "
                "dissect one: torch.save(checkpoint[key], path))",
                path,
                wrapped[0],
                listed([repr(k) for k in others], 5),
            )
        return obj[wrapped[0]]
    return obj


def key_groups(keys: Iterable[str], shown: int = 4) -> str:
    """`keys` counted by their first component, most first: "'encoder_q.' (320),
    'encoder_k.' (320), 'queue' (1)" (a key without a dot is its own group), cut after
    `shown`."""
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in keys)
    return listed([f"{name!r} ({n})" for name, n in counts.most_common()], shown)


def listed(items: Sequence[str], most: int) -> str:
    """The first `most` of `items` joined with ', ', then ', ... (N in all)' if there are
    more."""
    more = f", ... ({len(items)} in all)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _entry_of(whole: Any, entry: str, path: str) -> Any:
    """The object under `entry` ('/'-separated keys: `teacher`, `state_dict/model`)."""
    obj, walked = whole, []
    for part in entry.split("/"):
        if not isinstance(obj, Mapping) or part not in obj:
            at = "/".join(walked) or "its top level"
            if isinstance(obj, Mapping):
                keys = [repr(str(k)) for k in obj]
                there = f"the keys there are {listed(keys, 8)}" if keys else "nothing is there"
            else:
                there = f"a value of type {type(obj).__name__} is there"
            raise SelectionError(f"entry={entry!r}: {path} has no {part!r} at {at}; {there}")
        obj = obj[part]
        walked.append(part)
    if not isinstance(obj, Mapping):
        raise SelectionError(
            f"entry={entry!r}: {path} holds a value of type {type(obj).__name__} there, not a "
            "state dict"
        )
    return obj


def _under(key: str, name: str) -> bool:
    """Whether `key` is `name` or inside it (`fc` holds `fc.weight`, not `fcx.weight`)."""
    name = name.removesuffix(".")
    return key == name or key.startswith(f"{name}.")


def select_keys(
    state_dict: Mapping[str, Any], *, prefix: str = "", drop: Sequence[str] = (), path: str = ""
) -> dict[str, Any]:
    """The weights of one network in a checkpoint that holds several: the keys under
    `prefix` with it stripped (MoCo's `encoder_q` beside `encoder_k`, DINO's `backbone`
    beside its projection `head`), less those under any of `drop` (named without the
    prefix: MoCo v2's projection MLP `fc`, SwAV's `projection_head` and `prototypes`).
    Names are whole components (`fc` holds `fc.0.weight`, not `fcx.weight`); the keys left
    out are counted in the log.

    Raises:
      SelectionError: `prefix` holds no key, or one of `drop` none of the selected ones
        (each naming the keys' first components).
    """
    where = f"{path}: " if path else ""
    selected = dict(state_dict)
    if prefix:
        name = prefix.removesuffix(".") + "."
        if not any(k.startswith(name) for k in state_dict):  # `load_state_dict` strips it
            name = name.removeprefix("module.")
        selected = {k[len(name) :]: v for k, v in state_dict.items() if k.startswith(name)}
        if not selected:
            raise SelectionError(
                f"prefix={prefix!r}: {where}no key starts with {name!r}; the keys start "
                f"with {key_groups(state_dict)}"
            )
        if outside := [k for k in state_dict if not k.startswith(name)]:
            logging.info(
                "%s%d keys outside %r left out: %s", where, len(outside), name, key_groups(outside)
            )
    out = dict(selected)
    for name in drop:
        dropped = [k for k in selected if _under(k, name)]
        if not dropped:
            part = name.removesuffix(".")
            raise SelectionError(
                f"drop={name!r}: {where}no key{' under the prefix' if prefix else ''} is "
                f"{part!r} or starts with {part + '.'!r}; they start with {key_groups(selected)}"
            )
        logging.info("%s%d keys under %r dropped", where, len(dropped), name)
        for k in dropped:
            out.pop(k, None)
    return out


def load_state_dict(
    path: str | os.PathLike[str], *, entry: str | None = None
) -> dict[str, np.ndarray]:
    """The state dict in a weight file: torch key -> numpy array.

    Unwraps training checkpoints that keep it under one of `WRAPPER_KEYS`
    (`{'epoch': ..., 'state_dict': ..., 'args': Namespace(...)}`; several such keys are
    refused) or under `entry` where given (DINO's `teacher`; '/' between the keys of nested
    mappings), reads a whole pickled model (`torch.save(model)`, alone or under such a key)
    as its state dict without importing its classes, strips a DataParallel `module.` prefix,
    and widens bfloat16 to float32.

    Objects pickled beside the weights (a training script's config, a class) are inert
    records, named in the log.

    Raises:
      UnsafeCheckpointError: the weights hold an object other than tensors and modules,
        which it would take code to rebuild.
      CheckpointError: the file is unreadable or holds no state dict.
      SelectionError: nothing is under `entry`.
    """
    path = os.fspath(path)
    whole = load_checkpoint(path)
    if entry is not None:
        whole = _entry_of(whole, entry, path)
    if not isinstance(whole, Mapping):
        if (refusal := torch_file.refusal_in(whole)) is not None:
            raise _named(refusal, path)
        raise CheckpointError(f"{path}: holds a {type(whole).__name__}, not a state dict")
    obj = whole if entry is not None else _state_dict_of(whole, path)
    if (refusal := torch_file.refusal_in(obj)) is not None:
        raise _named(refusal, path)
    if isinstance(obj, torch_file.ModuleWeights):
        logging.info(
            "%s: the weights of a pickled %s, read as data (none of its code imported or run)",
            path,
            obj.qualified,
        )
        if obj.dilated:
            shown = ", ".join(f"{k} {v}" for k, v in list(obj.dilated.items())[:3])
            logging.warning(
                "%s: the pickled %s dilates %d convolutions (%s%s), which its weights do "
                "not show: no architecture of the zoo dilates one (a dilated ResNet, "
                "replace_stride_with_dilation, is another network), so loaded into one its "
                "numbers are not the file's; a model of your own must dilate them as it does",
                path,
                obj.qualified,
                len(obj.dilated),
                shown,
                ", ..." if len(obj.dilated) > 3 else "",
            )
    if others := torch_file.stand_in_names(whole):
        logging.info(
            "%s: beside the weights, pickled %s, read as inert records (none imported or run)",
            path,
            ", ".join(others),
        )
    not_arrays = [
        f"{k}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, np.ndarray)
    ]
    if not_arrays and (inside := _tensor_dicts(obj)):
        largest = max(reversed(inside), key=lambda k: len(obj[k]))  # DINO's teacher
        raise CheckpointError(
            f"{path}: state dicts under {listed([repr(k) for k in inside], 5)}, none under "
            f"{WRAPPER_KEYS}; read one with models/convert.py --entry={largest} "
            "(README: Self-supervised checkpoints)"
        )
    if not_arrays:
        shown = ", ".join(not_arrays[:5]) + (", ..." if len(not_arrays) > 5 else "")
        raise CheckpointError(
            f"{path}: not a state dict of tensors; {len(not_arrays)} entries are not tensors "
            f"({shown}). A wrapped checkpoint should keep its weights under one of "
            f"{WRAPPER_KEYS}."
        )
    try:
        return strip_prefix({str(k): v for k, v in obj.items()})
    except WeightMappingError as err:
        raise CheckpointError(f"{path}: {err}") from None
