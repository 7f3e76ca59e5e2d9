"""The real-kernel lab: a Debian kernel booted under QEMU with three virtio-gpu monitors, vkms, vgem and
mbochs, whose screens the host reads back and whose monitors it plugs and unplugs.

``cache.ensure()`` prepares the kernel and the out-of-tree modules, ``vm.run()`` boots the VM and runs a
command in it with the host services of ``channel`` available, ``guest`` is the launcher inside.
"""
