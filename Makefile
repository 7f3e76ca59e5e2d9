# directflip — the two commands a fresh Debian machine needs:
#   make demo   the main job (on a machine without a KMS device it boots the virtual lab)
#   make test   unit and bad-input tests on the host, then the real-kernel lab tests (tests/lab,
#               tests/reliability/lab)
# Both install what they need themselves (apt packages, pip packages, the lab's kernel and modules).

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
APT_PACKAGES = libdrm-dev pkg-config gcc clang-format systemd udev dbus-daemon qemu-system-x86
# libvirt for `kind: libvirt` guests and the lab's libvirtd, without its recommends (storage drivers,
# dnsmasq, ...): libvirt-dev builds the binding below.
LIBVIRT_APT = libvirt-dev libvirt-daemon-system
# libvirt's binding, built against Debian 12's libvirt-dev (9.0)
LIBVIRT_PYTHON = libvirt-python==9.0.0

.PHONY: deps lab-setup test unit lab demo lint bench bench-host clean

# $(call apt_install,PACKAGES,EXTRA apt-get FLAGS): install those of PACKAGES that are missing
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages:$$missing"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(2) \
			$$missing >/dev/null; \
	fi
endef

deps:
	$(call apt_install,$(APT_PACKAGES),)
	$(call apt_install,$(LIBVIRT_APT),--no-install-recommends)
	$(PIP) install -q --disable-pip-version-check -e '.[test,libvirt]' -e ./tools '$(LIBVIRT_PYTHON)'

lab-setup: deps
	$(PYTHON) -m directflip_tools.lab setup

unit: deps
	$(PYTHON) -m pytest -q tests/unit tests/reliability --ignore=tests/reliability/lab

lab: lab-setup
	$(PYTHON) -m directflip_tools.lab test -q

test: unit lab

demo: deps
	$(PYTHON) -m directflip_tools.demo

# The gates CI runs before the tests (CONTRIBUTING.md): ruff (complexity <= 12 per function), mypy
# --strict on the pure modules and the KMS layer, clang-format on the C. The C's -Wall -Wextra -Werror
# is in its builds (deps builds the cffi module).
C_SOURCES = $(wildcard native/*.c native/*.h bench/*.c)

lint: deps
	$(PYTHON) -m ruff check compositor tools native tests bench
	$(PYTHON) -m mypy
	clang-format --dry-run --Werror $(C_SOURCES)

bench: lab-setup
	@echo "make bench: $$(date -u '+%Y-%m-%d %H:%M UTC'); host: $$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $$(nproc) CPUs, load average $$(cut -d' ' -f1-3 /proc/loadavg)"
	$(PYTHON) bench/bench_planner.py
	$(PYTHON) bench/bench_startup.py
	$(PYTHON) bench/bench_copy.py
	$(PYTHON) bench/bench_host.py
	$(PYTHON) -m directflip_tools.lab run --timeout 1800 -- $(PYTHON) $(CURDIR)/bench/run_lab.py
	@echo "make bench: done $$(date -u '+%H:%M UTC'); host load average $$(cut -d' ' -f1-3 /proc/loadavg)"

# The real compositor on a fake display kernel: the C data plane against the Python frame path, the
# copy path and the floors of any frame path, on this machine: no KMS device, no lab.
bench-host: deps
	$(PYTHON) bench/bench_host.py

clean:
	rm -rf build *.egg-info compositor/_native*.so out
