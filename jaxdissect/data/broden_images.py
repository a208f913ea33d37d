"""The files a Broden folder's index.csv lists: walked into the fingerprint, their headers
checked, images and label PNGs decoded.

Each listed file must be a regular file (a FIFO would hang the reader) and stay inside
the folder through any symlink; its size, mtime and ctime (or its bytes) go into the
fingerprint. A header check opens each image and label PNG for its size and mode
against its index.csv row, without decoding. Images of any PIL mode become 8-bit RGB as
`jaxdissect.data.images` says, or are refused; label PNGs must be 8-bit (label = R +
256 * G), greyscale only where they hold label 0 alone, and every chunk must pass its CRC
when decoded. Every problem raises `BrodenFormatError` naming the file and index.csv line.
"""

from __future__ import annotations

import io
import os
import pathlib
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxdissect.data import images
from jaxdissect.data.broden_tables import IMAGES_DIR, INDEX_FILE, BrodenFormatError, Record
from jaxdissect.data.files import DatasetFiles, Fingerprint, check_regular
from jaxdissect.labelspace import LabelSpace

# PIL modes whose RGB conversion is exact (8 bits per channel).
_PNG_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"})


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_checksums(data: bytes, path: pathlib.Path, where: str) -> None:
    """Every chunk of PNG `data` against its CRC-32. PIL reads the pixel data (IDAT) without
    its checksum, and stops decompressing before zlib's own: a damaged label PNG would
    decode to other labels, silently. Data that is no PNG, or ends inside a chunk, is left
    to the decoder to refuse."""
    if not data.startswith(_PNG_SIGNATURE):
        return
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return
        kind = bytes(view[pos + 4 : pos + 8])
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            raise BrodenFormatError(
                f"{path}: its {kind.decode('latin-1')!r} chunk at byte {pos} fails its CRC "
                f"({where}); the file is corrupt, re-extract it."
            )
        if kind == b"IEND":
            return
        pos = end


class open_image:
    """Context manager: opens an image file lazily, mapping failures to BrodenFormatError.

    With `checksums`, the file is read whole first and a PNG's chunks checked against their
    CRCs (`check_png_checksums`): for label PNGs, which PIL decodes without them.
    """

    def __init__(
        self,
        path: pathlib.Path,
        where: str,
        what: str,
        *,
        checked: bool = False,
        checksums: bool = False,
    ):
        self.path, self.where, self.what, self.checked = path, where, what, checked
        self.checksums = checksums
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        # A FIFO would block Image.open forever: refused from its stat, before opening
        # (unless `checked`: the caller has just stat'ed it).
        if not self.checked:
            check_regular(self.path, self.where, self.what, BrodenFormatError)
        data = self._read(self.path.read_bytes) if self.checksums else None
        if data is not None:
            check_png_checksums(data, self.path, self.where)
        source = self.path if data is None else io.BytesIO(data)
        self.image = self._read(lambda: Image.open(source))
        return self.image

    def _read(self, read):
        """`read()`, its failures as BrodenFormatError naming the file and its row."""
        try:
            return read()
        except FileNotFoundError:
            raise BrodenFormatError(
                f"{self.path}: {self.what} not found (listed at {self.where}); the images/ "
                "folder is incomplete, re-extract the dataset."
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BrodenFormatError(
                f"{self.path}: cannot read {self.what} ({type(e).__name__}: {e}; listed at "
                f"{self.where}); the file is corrupt or not an image, re-extract it."
            ) from None

    def __exit__(self, *exc) -> None:
        if self.image is not None:
            self.image.close()


def _check_size(
    root: pathlib.Path,
    rec: Record,
    path: pathlib.Path,
    im: Image.Image,
    names: tuple[str, str, str],
    size: tuple[int, int],
) -> None:
    """`im` is `size` (h, w) as its row says; `names`: (what it is, the row's columns, the
    file in the advice)."""
    what, columns, file = names
    if im.size != (size[1], size[0]):
        raise BrodenFormatError(
            f"{path}: {what} is {im.size[1]}x{im.size[0]} (h x w) but "
            f"{root / INDEX_FILE} line {rec.line} says {columns} = {size[0]},{size[1]}; "
            f"the {file} or index.csv comes from another Broden resolution, re-extract "
            "the dataset."
        )


def check_image_header(
    root: pathlib.Path, rec: Record, path: pathlib.Path, where: str, im: Image.Image
) -> None:
    """Size and mode of an opened (not yet decoded) image against its index.csv row."""
    _check_size(root, rec, path, im, ("image", "ih,iw", "image"), (rec.ih, rec.iw))
    try:
        images.check_mode(im.mode)
    except images.UnsupportedImageMode as e:
        raise BrodenFormatError(f"{path} ({where}): {e}.") from None


def check_png_header(
    root: pathlib.Path, rec: Record, path: pathlib.Path, where: str, im: Image.Image
) -> None:
    """Size and mode of an opened (not yet decoded) label PNG against its index.csv row."""
    if im.format != "PNG":  # a lossy format shifts R + 256 * G onto other labels
        raise BrodenFormatError(
            f"{path}: a {im.format or 'non-PNG'} file ({where}); Broden label files must be "
            "PNG (lossless, label = R + 256 * G). Re-extract the file."
        )
    _check_size(root, rec, path, im, ("segmentation", "sh,sw", "PNG"), (rec.sh, rec.sw))
    if im.mode not in _PNG_MODES or _sixteen_bit(im):
        mode = repr(im.mode) if im.mode not in _PNG_MODES else f"{im.mode} with 16-bit channels"
        raise BrodenFormatError(
            f"{path}: PNG mode {mode} is not 8-bit RGB ({where}); Broden label PNGs "
            "store label = R + 256 * G in 8-bit channels. Re-extract the file."
        )


# Modes whose RGB has R = G = B: a Broden label PNG (blue unused, 0) in one of them can
# only hold label 0 everywhere.
_GREY_MODES = frozenset({"L", "LA", "1"})


def check_label_colours(rgb: np.ndarray, mode: str, path: pathlib.Path, where: str) -> None:
    """A greyscale label PNG with any nonzero pixel is refused: its grey value v would read
    as label v * 257 (R = G = v), where a mask of label numbers was meant."""
    if mode in _GREY_MODES and rgb.any():
        raise BrodenFormatError(
            f"{path}: greyscale PNG (mode {mode}) with nonzero pixels ({where}); Broden label "
            "PNGs are RGB with label = R + 256 * G. Convert it: R = label % 256, "
            "G = label // 256, B = 0."
        )


def check_palette_indices(im: Image.Image, path: pathlib.Path, where: str) -> None:
    """A decoded palette label PNG whose pixels index past its palette is refused: PIL
    reads such a pixel as black, label 0."""
    if im.mode not in ("P", "PA"):
        return
    colours = len(im.getpalette() or ()) // 3
    index = np.asarray(im if im.mode == "P" else im.getchannel(0))
    if index.size and int(index.max()) >= colours:
        raise BrodenFormatError(
            f"{path}: a pixel indexes colour {int(index.max())} of a {colours}-colour palette "
            f"({where}); the file is corrupt, re-extract it."
        )


def _sixteen_bit(im: Image.Image) -> bool:
    """Whether a PNG stores 16 bits a channel (PIL opens 16-bit RGB as mode RGB, high bytes)."""
    return any(";16" in str(tile.args) for tile in getattr(im, "tile", ()))


def decode(im: Image.Image, path: pathlib.Path) -> np.ndarray:
    """uint8 [h, w, 3] RGB of `im`, fully decoded (truncated files fail here) or BrodenFormatError."""
    try:
        im.load()
        return images.to_rgb8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BrodenFormatError(
            f"{path}: cannot decode ({type(e).__name__}: {e}); the file is truncated or "
            "corrupt, re-extract it."
        ) from None


def record_files(labels: LabelSpace, rec: Record) -> list[tuple[str, str]]:
    """(path relative to images/, index.csv column) of every file of a row: image, then PNGs."""
    files = [(rec.image, "image")]
    for cat in labels.categories:
        files.extend((png, cat) for png in rec.pixel.get(cat, ()))
    return files


def listed_at(index: pathlib.Path, rec: Record, column: str) -> str:
    """Where a file is listed, for messages: the line and column of `index` (index.csv)."""
    return f"{index} line {rec.line}, column {column!r}"


def _record_paths(root: pathlib.Path, labels: LabelSpace, records: Sequence[Record]):
    """(record, path relative to images/, full path, where, what) of every listed file."""
    images_dir = os.path.join(root, IMAGES_DIR)
    index = root / INDEX_FILE
    for rec in records:
        for rel, column in record_files(labels, rec):
            where = listed_at(index, rec, column)
            what = "image" if column == "image" else "segmentation PNG"
            yield rec, rel, os.path.join(images_dir, rel), where, what


def walk_files(
    root: pathlib.Path, labels: LabelSpace, records: Sequence[Record], digest: Fingerprint
) -> None:
    """Checks every file of `records` (regular, inside `root`) and adds it to `digest`."""
    tree = DatasetFiles(root, BrodenFormatError)
    for _, rel, path, where, what in _record_paths(root, labels, records):
        digest.add_file(rel, path, tree.stat(path, where, what))


def check_headers(root: pathlib.Path, labels: LabelSpace, records: Sequence[Record]) -> None:
    """Opens every file of `records` (already checked regular) for its header."""
    for rec, _, path, where, what in _record_paths(root, labels, records):
        check = check_image_header if what == "image" else check_png_header
        with open_image(pathlib.Path(path), where, what, checked=True) as im:
            check(root, rec, pathlib.Path(path), where, im)


# Version of the header checks: a memo of an older version's scan is not trusted.
_HEADER_CHECKS = 2


def header_memo_path(memo: str | pathlib.Path | None, fingerprint: str) -> pathlib.Path | None:
    if memo is None:
        return None
    return pathlib.Path(memo).expanduser() / f"broden-headers-v{_HEADER_CHECKS}-{fingerprint}"
