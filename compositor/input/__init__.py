"""Seat input: the evdev devices of a seat, the focus that routes them, and the sinks they reach.

    devices (evdev, udev)  ──▶  router (seat → focused monitor → shown guest)  ──▶  InputSink
                                                                                   (QEMU D-Bus,
                                                                                    frame socket,
                                                                                    uinput)
"""
