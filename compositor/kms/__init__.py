"""directflip's KMS layer: the only code that speaks to libdrm. No policy or guest knowledge here."""

from .card import (
                   Card,
                   Connector,
                   Crtc,
                   DumbBuffer,
                   Encoder,
                   FlipEvent,
                   Framebuffer,
                   Plane,
                   Property,
                   list_cards,
)
from .errors import Busy, DeviceError, KmsBug, KmsError, NotMaster, Rejected, Retry
from .mode import Mode, choose_mode, default_mode

__all__ = ["Card", "Connector", "Crtc", "DumbBuffer", "Encoder", "FlipEvent", "Framebuffer", "Plane",
           "Property", "list_cards", "Busy", "DeviceError", "KmsBug", "KmsError", "NotMaster", "Rejected",
           "Retry", "Mode", "choose_mode", "default_mode"]
