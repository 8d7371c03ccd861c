#!/bin/sh
# Runs inside the test guest after switch_root (PID 1): the project's guest tests with the host's node, then power
# off. Results go to /vfm-out (a 9p share the host reads); the kernel must never see PID 1 exit (that panics).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
mount -t tmpfs tmpfs /tmp
echo "VFM-GUEST: kernel $(uname -r), running tests in $vfm_repo"
cd "$vfm_repo" && "$vfm_node" dist/test/kernel/guest-main.js /vfm-out "$vfm_filter"
echo "VFM-GUEST: tests exited with $?"
sync
echo o > /proc/sysrq-trigger
sleep 30
