"""Stand-ins shared by the host tests: fakes of the kernel and of peers, stricter than the real thing.

Every fake here refuses what the real interface would refuse and more (an unknown id, a handle used
after it was freed, a blob never destroyed), so a test that passes against it does not lean on a
driver's leniency. The directory is on the tests' import path (pytest's `pythonpath`), so a test
imports `fakes.<module>`.
"""
