"""Guest sources: each knows one guest and emits Frames (VFIO mdev planes, QEMU D-Bus, frame socket,
synthetic guests). Sources never touch KMS."""
