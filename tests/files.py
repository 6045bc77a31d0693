"""Files to upload, built in memory (tests of attachments and ``bench/uploads.py``)."""

from __future__ import annotations

import io
import os
import struct
import uuid
import zlib


def png(width: int = 64, height: int = 48, mode: str = "RGB", color=(200, 30, 30), **save) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, "PNG", **save)
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48, mode: str = "RGB", color=(20, 120, 200), noise: bool = False,
         **save) -> bytes:
    """A JPEG; with ``noise``, a photo-like one (a gradient with grain, a few
    MB at 4000x3000) rather than a flat colour."""
    from PIL import Image, ImageChops

    img = Image.new(mode, (width, height), color)
    if noise:
        gradient = Image.linear_gradient("L").resize((width, height))
        grain = Image.effect_noise((width, height), 40)
        img = Image.merge("RGB", (gradient, ImageChops.add(gradient, grain, 2.0), grain))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=save.pop("quality", 90), **save)
    return out.getvalue()


def pdf(pages: int = 3, size: int = 0, encrypt: str | None = None) -> bytes:
    """A PDF of ``pages`` blank pages; with ``size``, about that many bytes
    (a file embedded in it, random: incompressible); with ``encrypt``, a
    user password."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=612, height=792)
    if size:
        writer.add_attachment("data.bin", os.urandom(size))
    if encrypt:
        writer.encrypt(encrypt, algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG of ``width`` x ``height`` black 1-bit pixels, a few
    hundred kB (its IDAT compressed with zlib from a stream of zero rows,
    built row by row: never the whole image in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def multipart(content: bytes, name: str = "file.bin", fields: dict | None = None,
              content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """``(body, Content-Type)`` of a ``multipart/form-data`` upload."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
