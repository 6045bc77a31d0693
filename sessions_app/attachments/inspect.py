"""What an uploaded file is, read from its content (contract §11).

:func:`inspect` takes the upload's temporary file and returns what to
store: the type from the magic bytes, confirmed by a real parse (Pillow for
images, pypdf for PDFs, a strict UTF-8 decode for text), never from the
file's name or the client's header. Images are decoded under a pixel limit
(Pillow's decompression-bomb guard), turned upright by their EXIF
orientation, scaled down to ``OMNI_IMAGE_MAX_SIDE`` and written anew
without metadata (EXIF, GPS, XMP, text chunks, comments); PDFs and text
files are stored as uploaded.

Refusals: :class:`Unsupported` (415 ``unsupported_media_type``) for any
other type, :class:`Invalid` (400 ``invalid_attachment``) for a file that
does not parse as its type. Runs in a worker thread (it is CPU and file
work), never on the event loop.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import struct
import tempfile
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import PurePath

from django.conf import settings

from ..errors import ApiError, BadRequest

CHUNK = 64 * 1024

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
TEXT_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".csv": "text/csv"}
ACCEPTED = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf",
            "text/plain", "text/markdown", "text/csv")
# Magic bytes of types we refuse outright (a binary file is never text).
BINARY_MAGIC = (b"PK\x03\x04", b"\x7fELF", b"MZ", b"\x1f\x8b", b"BZh", b"7z\xbc\xaf", b"Rar!",
                b"\xca\xfe\xba\xbe", b"\x00\x00\x01\x00", b"II*\x00", b"MM\x00*", b"BM", b"OggS",
                b"ID3", b"fLaC", b"\x00asm", b"SQLite format 3")


# C0 controls but tab, newlines and form feed: not in a text file.
CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


class Unsupported(ApiError):
    status, code = 415, "unsupported_media_type"


class Invalid(BadRequest):
    code = "invalid_attachment"


@dataclass
class Inspected:
    """An accepted upload: its type and facts, and the file to store (a
    temporary file of this process, removed by :meth:`cleanup`)."""

    media_type: str
    path: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    pages: int | None = None
    _temporary: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self._temporary:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def clean_name(name: str | None) -> str:
    """The file's name as shown to people: its last path part, no control
    characters, at most 255 characters (``file`` when nothing is left)."""
    name = PurePath((name or "").replace("\\", "/")).name
    name = "".join(ch for ch in unicodedata.normalize("NFC", name)
                   if unicodedata.category(ch)[0] != "C").strip()
    if len(name) > 255:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 254 - len(ext)] + dot + ext) if dot and len(ext) < 16 else name[:255]
    return name or "file"


def sniff(head: bytes) -> str | None:
    """The type the first bytes claim (``"text"`` when no binary magic)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if not head or head.startswith(BINARY_MAGIC) or b"\x00" in head:
        return None
    return "text"


def inspect(path: str, size: int, name: str) -> Inspected:
    """Read the upload at ``path`` (``size`` bytes) as what its content says."""
    if size == 0:
        raise Invalid("the file is empty")
    with open(path, "rb") as f:
        head = f.read(4096)
    kind = sniff(head)
    if kind is None:
        raise Unsupported("this kind of file is not accepted; send an image (PNG, JPEG, GIF, WebP), "
                          "a PDF or a UTF-8 text file (plain, Markdown, CSV)")
    if kind.startswith("image/"):
        return _image(path, kind)
    if kind == "application/pdf":
        return _pdf(path, size)
    return _text(path, size, name)


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


# --- images ----------------------------------------------------------------------

# Image decodes at once in this process: each may hold a decoded image of up
# to OMNI_IMAGE_MAX_PIXELS (4 bytes a pixel); more at once than cores gains
# no time, only memory. The others wait on their worker thread.
DECODES = threading.BoundedSemaphore(2)
# What of a source image's ``info`` the re-encoded one keeps: transparency
# and animation timing. Everything else (EXIF, XMP, ICC of another colour
# space, comments, text chunks, dpi...) is dropped: Pillow writes some of
# ``info`` by default (a JPEG's or GIF's comment, for one).
KEEP_INFO = ("transparency", "duration", "loop", "background")


def _image(path: str, claimed: str) -> Inspected:
    from PIL import Image, UnidentifiedImageError

    limit = settings.OMNI_IMAGE_MAX_PIXELS
    # Pillow's own guard: Image.open raises past twice this (the check
    # below refuses past it); its warning in between is not needed.
    Image.MAX_IMAGE_PIXELS = limit
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        with DECODES, Image.open(path, formats=list(IMAGE_TYPES)) as img:
            media_type = IMAGE_TYPES.get(img.format)
            if media_type != claimed:
                raise Invalid(f"the file starts as {claimed} but does not parse as one")
            _check_pixels(img.width, img.height, limit)
            return _reencode(img, path)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise Invalid(f"the image would decompress past the server's limit: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError,
            struct.error, ZeroDivisionError) as exc:
        raise Invalid(f"the image cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _check_pixels(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise Invalid(f"the image is {width}x{height}: over the server's limit of {limit} pixels")


def _webp_lossless(path: str) -> bool:
    """A WebP whose image is lossless (a ``VP8L`` chunk, not ``VP8 ``)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[12:16] == b"VP8L":
        return True
    if head[12:16] != b"VP8X":
        return False
    with open(path, "rb") as f:  # extended: walk the chunks to the image's
        f.seek(12)
        while len(chunk := f.read(8)) == 8:
            kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind in (b"VP8L", b"VP8 ", b"ANMF"):
                if kind == b"ANMF":  # an animation's first frame: its image chunk follows 16 bytes on
                    f.seek(16, 1)
                    return f.read(4) == b"VP8L"
                return kind == b"VP8L"
            f.seek(size + (size & 1), 1)
    return False


def _fit(img, side: int):
    """``img`` (loaded) in a mode every target format writes and the
    resampling filters take, scaled into ``side`` x ``side``; may be ``img``
    itself, changed in place."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit greyscale: to 8 bits, scaled
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        if max(img.size) > side or has_alpha:  # a palette resamples badly: its colours instead
            img = img.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "CMYK":
        img = img.convert("RGB")
    elif mode in ("LA", "La"):
        pass
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
    if max(img.size) > side:
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img


def _reencode(img, path: str) -> Inspected:
    """The image written anew: upright, at most ``OMNI_IMAGE_MAX_SIDE`` on a
    side, no metadata (only the ICC colour profile of an image whose colour
    space is unchanged, a palette's transparency and, for animations, the
    frames' timing are kept)."""
    from PIL import ImageOps, ImageSequence

    side = settings.OMNI_IMAGE_MAX_SIDE
    limit = settings.OMNI_IMAGE_MAX_PIXELS
    fmt = img.format
    animated = getattr(img, "is_animated", False) and fmt in ("GIF", "WEBP")
    source_mode = img.mode
    icc = img.info.get("icc_profile")
    loop = img.info.get("loop", 0)
    frames, durations = [], []
    if animated:
        decoded = 0
        for frame in ImageSequence.Iterator(img):
            # Pillow grows a GIF's canvas to a frame larger than it: each
            # frame's size is checked, and all frames' pixels together.
            _check_pixels(frame.width, frame.height, limit)
            decoded += frame.width * frame.height
            if decoded > limit:
                raise Invalid(f"the animation's frames are over the server's limit of {limit} pixels "
                              "together")
            frame.load()
            durations.append(frame.info.get("duration", 100))
            frames.append(_fit(frame.copy(), side))
    else:
        if fmt == "JPEG" and max(img.size) > side:
            # Decode at 1/2, 1/4 or 1/8 scale, no smaller than the target:
            # a quarter of the memory and time or less. The box must keep
            # the aspect ratio (a square one would rule out any scale).
            ratio = side / max(img.size)
            img.draft(img.mode, (max(1, round(img.width * ratio)), max(1, round(img.height * ratio))))
        img.load()
        out = _fit(img, side)
        ImageOps.exif_transpose(out, in_place=True)  # upright; a copy only when it turns
        frames.append(out)
    first = frames[0]
    width, height = first.size
    save = {"format": fmt}
    if icc and first.mode == source_mode:  # a profile of the colour space it describes
        save["icc_profile"] = icc
    if fmt == "JPEG":
        if first.mode not in ("RGB", "L"):
            frames[0] = first = first.convert("RGB")
            save.pop("icc_profile", None)
        save.update(quality=90, optimize=False)
    elif fmt == "WEBP":
        save.update(lossless=True) if _webp_lossless(path) else save.update(quality=90)
    if animated:
        save.update(save_all=True, append_images=frames[1:], duration=durations, loop=loop)
    for frame in frames:
        frame.info = {key: frame.info[key] for key in KEEP_INFO if key in frame.info}
    fd, out_path = tempfile.mkstemp(prefix="omni-image-", dir=settings.FILE_UPLOAD_TEMP_DIR)
    os.close(fd)
    try:
        # No exif=, comment=, xmp= or pnginfo=, and no such info left to
        # carry: nothing of the source's metadata is written.
        first.save(out_path, **save)
        return Inspected(IMAGE_TYPES[fmt], out_path, os.path.getsize(out_path), _digest(out_path),
                         width=width, height=height, _temporary=[out_path])
    except BaseException:
        os.unlink(out_path)
        raise


# --- PDFs ----------------------------------------------------------------------

def _pdf(path: str, size: int) -> Inspected:
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a broken PDF is the caller's 400, not our log
    from pypdf.errors import PyPdfError

    try:
        # An open file, not the path: given a path, pypdf reads the whole
        # file into memory first; from a file it reads what it parses.
        with open(path, "rb") as f:
            reader = PdfReader(f, strict=False)
            if reader.is_encrypted:
                raise Invalid("the PDF is encrypted: send it without a password")
            pages = len(reader.pages)
    except ApiError:
        raise
    except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            RecursionError, AssertionError) as exc:
        raise Invalid(f"the PDF cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if pages < 1:
        raise Invalid("the PDF has no pages")
    return Inspected("application/pdf", path, size, _digest(path), pages=pages)


# --- text ----------------------------------------------------------------------

def _text(path: str, size: int, name: str) -> Inspected:
    """UTF-8 text (a BOM is allowed), no NUL or other C0 controls than tab,
    newlines and form feed. Its kind (plain, Markdown, CSV) is the name's:
    the content is text either way."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                text = decoder.decode(chunk)
                if CONTROL.search(text):
                    raise Unsupported("the file is binary, not text")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise Invalid(f"the text is not UTF-8 (byte {exc.start} of a chunk: {exc.reason})") from None
    media_type = TEXT_TYPES.get(PurePath(name).suffix.lower(), "text/plain")
    return Inspected(media_type, path, size, sha.hexdigest())
