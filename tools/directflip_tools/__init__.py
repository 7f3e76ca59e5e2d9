"""directflip's tools, apart from the product: the real-kernel lab (`lab`), the stand-in guests the
tests and the demo drive (`synthetic`: a frame-socket guest; `qemu_peer`: a peer that speaks QEMU's
-display dbus), the test patterns read back from monitors (`patterns`) and the demo (`demo`).

They are the separate distribution `directflip-tools` (tools/pyproject.toml), installed from the
checkout by `make deps`; the `directflip` wheel does not contain them. They may import the product
(`compositor`); the product never imports them.
"""
