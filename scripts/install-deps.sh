#!/usr/bin/env bash
# Install what vmtrace's tests and demo need on a fresh Debian 12 machine, and nothing
# that is already there. Run as root (CI and the dev machines are); as a normal user it
# only reports what is missing.
set -euo pipefail

# Debian packages for the real parts: the guest kernel and userland, QEMU, and trace-cmd
# as the decoding oracle. gcc builds vmtrace's own C workloads and reference collector
# (src/vmtrace/lab/csrc/), static for the guest, so libc6-dev is needed too.
PACKAGES=(
  qemu-system-x86 linux-image-cloud-amd64 busybox-static trace-cmd kernelshark
  gcc libc6-dev make cpio gzip python3-venv
  chromium  # headless screenshots of the HTML timeline in tests
  # Java 17 for pyspark (a dev extra; Spark 4 needs 17+): the fleet queries are checked on Spark
  openjdk-17-jre-headless
  # libvirt: a domain from `vmtrace prepare --libvirt` is defined, started and traced in a test
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libxml2-utils
)
PACKAGES+=(${VMTRACE_EXTRA_PACKAGES:-})

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing Debian packages (run as root): ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# tracefs is not mounted on a fresh machine.
if [ "$(id -u)" = 0 ] && [ ! -e /sys/kernel/tracing/trace_pipe ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
