"""The guest's /init, kept as text here so that it ships inside the Python package.

It does what udev and systemd would do on a real guest, in the smallest form: mount the
pseudo filesystems and tracefs, load the virtio modules, wait until every virtio-serial
port the host wired has a name, and make the `/dev/virtio-ports/NAME` links that the
2012 agent and its users expect. Then it runs the per-run script the host appended as
a second cpio archive, prints its exit status behind a per-boot nonce (so nothing the
workload prints can fake it), and powers off. If anything goes wrong the kernel panics
(`panic=-1` plus QEMU's `-no-reboot`), so QEMU always exits.
"""

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/lab/bin:/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /dev/pts /dev/virtio-ports
mount -t tmpfs tmpfs /tmp
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
exec </dev/console >/dev/console 2>&1
. /lab/env

arg() { sed -n "s/.*vmtrace\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
NONCE=$(arg nonce)
WANT=$(arg ports)
WANT=${WANT:-0}

for m in $(cat /lab/modules.order); do
    insmod /lab/modules/$m.ko || echo "vmtrace-lab: insmod $m failed"
done

# Ports appear in sysfs first and get their names a moment later (a control message
# from QEMU); wait for both, for at most about ten seconds.
named() {
    n=0
    for d in /sys/class/virtio-ports/*; do
        [ -s "$d/name" ] && n=$((n + 1))
    done
    echo $n
}
i=0
while [ "$(named)" -lt "$WANT" ] && [ $i -lt 200 ]; do
    sleep 0.05
    i=$((i + 1))
done
for d in /sys/class/virtio-ports/*; do
    [ -s "$d/name" ] || continue
    ln -sf "../${d##*/}" "/dev/virtio-ports/$(cat "$d/name")"
done

CPUS=$(grep -c ^processor /proc/cpuinfo)
echo "VMTRACE-LAB-$NONCE READY cpus=$CPUS ports=$(named) kernel=$(uname -r)"
rc=0
if [ -f /lab/run.sh ]; then
    cd /tmp
    sh /lab/run.sh
    rc=$?
fi
echo "VMTRACE-LAB-$NONCE EXIT $rc"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""

# Helpers the per-run scripts source (`. /lab/lib.sh`): finding a port by name without
# udev, sending files to the host over the lab's own port, and copying the tracefs
# metadata a decoder needs in the raw-directory layout (docs/internals.md).
LIB_SCRIPT = r"""
FILES_PORT=vmtrace-lab-files
T=/sys/kernel/tracing

lab_port() {
    for d in /sys/class/virtio-ports/*; do
        if [ "$(cat "$d/name" 2>/dev/null)" = "$1" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

lab_send() {
    p=$(lab_port $FILES_PORT) || { echo "vmtrace-lab: no $FILES_PORT port" >&2; return 1; }
    tar cf "$p" "$@"
}

lab_tracefs_meta() {
    d=$1
    shift
    mkdir -p "$d/events"
    cat $T/events/header_page > "$d/header_page"
    cat $T/events/header_event > "$d/header_event"
    for s in "$@"; do
        for e in $T/events/$s/*/; do
            [ -f "$e/format" ] || continue
            n=${e%/}
            n=${n##*/}
            mkdir -p "$d/events/$s/$n"
            cat "$e/format" > "$d/events/$s/$n/format"
        done
    done
    cat $T/saved_cmdlines > "$d/saved_cmdlines"
    cat $T/printk_formats > "$d/printk_formats" 2>/dev/null
    cat /proc/kallsyms > "$d/kallsyms"
}
"""
