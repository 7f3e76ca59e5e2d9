"""Just enough of an RFB 3.8 client to plug and unplug a QEMU monitor.

QEMU forwards a VNC client's SetDesktopSize to the display device as new "UI info": virtio-gpu then
reports the head connected with that size as its preferred mode, or disconnected for 0x0, and raises
a display-change event that reaches the guest as a real ``HOTPLUG=1`` uevent. Writing the connector's
sysfs ``status`` does not do that.

The client speaks security type None, announces the ExtendedDesktopSize pseudo-encoding (without it
QEMU ignores SetDesktopSize), sends the request and waits for QEMU's answer: a FramebufferUpdate with an
ExtendedDesktopSize rectangle whose x is 1 (reply to a client request) and whose y is the status.
"""

from __future__ import annotations

import asyncio
import struct

ENCODING_RAW = 0
ENCODING_DESKTOP_SIZE = -223
ENCODING_EXTENDED_DESKTOP_SIZE = -308

MSG_SET_ENCODINGS = 2
MSG_SET_DESKTOP_SIZE = 251

# ExtendedDesktopSize status codes; QEMU answers 4 when it passed the request on to the device.
STATUS_TEXT = {0: "no error", 1: "resize is administratively prohibited", 2: "out of resources",
               3: "invalid screen layout", 4: "request forwarded"}
STATUS_OK = (0, 4)


class VncError(RuntimeError):
    pass


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise VncError("VNC server closed the connection") from None


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """RFB 3.8 handshake with security None; returns the server's bits per pixel."""
    version = await _read(reader, 12)
    if not version.startswith(b"RFB 003."):
        raise VncError(f"not an RFB server: {version!r}")
    writer.write(b"RFB 003.008\n")
    (count,) = struct.unpack("!B", await _read(reader, 1))
    if count == 0:
        (length,) = struct.unpack("!I", await _read(reader, 4))
        raise VncError(f"server refused: {(await _read(reader, length)).decode(errors='replace')}")
    types = await _read(reader, count)
    if 1 not in types:
        raise VncError(f"server offers no security type None (offers {list(types)})")
    writer.write(b"\x01")
    (result,) = struct.unpack("!I", await _read(reader, 4))
    if result != 0:
        raise VncError(f"security handshake failed ({result})")
    writer.write(b"\x01")  # ClientInit: shared
    header = await _read(reader, 24)
    bpp = header[4]
    (name_len,) = struct.unpack("!I", header[20:24])
    await _read(reader, name_len)
    encodings = (ENCODING_RAW, ENCODING_EXTENDED_DESKTOP_SIZE, ENCODING_DESKTOP_SIZE)
    writer.write(struct.pack(f"!BxH{len(encodings)}i", MSG_SET_ENCODINGS, len(encodings), *encodings))
    await writer.drain()
    return bpp


async def _next_resize_reply(reader: asyncio.StreamReader, bpp: int) -> int:
    """Read server messages until the reply to our SetDesktopSize; returns its status."""
    while True:
        (kind,) = struct.unpack("!B", await _read(reader, 1))
        if kind == 0:  # FramebufferUpdate
            (nrects,) = struct.unpack("!xH", await _read(reader, 3))
            for _ in range(nrects):
                x, y, w, h, enc = struct.unpack("!HHHHi", await _read(reader, 12))
                if enc == ENCODING_EXTENDED_DESKTOP_SIZE:
                    (screens,) = struct.unpack("!B3x", await _read(reader, 4))
                    await _read(reader, 16 * screens)
                    if x == 1:
                        return y
                elif enc == ENCODING_RAW:
                    await _read(reader, w * h * max(bpp // 8, 1))
                elif enc == ENCODING_DESKTOP_SIZE:
                    pass
                else:
                    raise VncError(f"unexpected rectangle encoding {enc}")
        elif kind == 1:  # SetColourMapEntries
            _, ncolours = struct.unpack("!xHH", await _read(reader, 5))
            await _read(reader, 6 * ncolours)
        elif kind == 2:  # Bell
            continue
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack("!3xI", await _read(reader, 7))
            await _read(reader, length)
        else:
            raise VncError(f"unexpected server message type {kind}")


async def set_desktop_size(socket_path: str, width: int, height: int, timeout: float = 15.0) -> int:
    """Ask the display behind a VNC unix socket for width x height (0x0: disconnect the head).

    Returns the server's status code; raises VncError if the server refused.
    """
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF) or (width == 0) != (height == 0):
        raise VncError(f"bad desktop size {width}x{height}")

    async def talk() -> int:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            bpp = await _handshake(reader, writer)
            screen = struct.pack("!IHHHHI", 0, 0, 0, width, height, 0)
            writer.write(struct.pack("!BxHHBx", MSG_SET_DESKTOP_SIZE, width, height, 1) + screen)
            await writer.drain()
            return await _next_resize_reply(reader, bpp)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    try:
        status = await asyncio.wait_for(talk(), timeout)
    except TimeoutError:
        raise VncError(f"no answer to SetDesktopSize from {socket_path} within {timeout:.0f} s") from None
    except OSError as exc:
        raise VncError(f"cannot talk to VNC socket {socket_path}: {exc}") from None
    if status not in STATUS_OK:
        raise VncError(f"SetDesktopSize {width}x{height} refused: {STATUS_TEXT.get(status, status)}")
    return status
