# Shared host-side helpers for the QEMU guest tests (sourced by run-*.sh and build-initramfs.sh).
#
# Owns: finding the guest kernel, copying binaries with their shared libraries into an initramfs
# tree, kernel-module lists, writing the cpio archive, choosing KVM or TCG, booting the guest with
# a bounded timeout, and reading its serial console.
#
# The guest protocol (printed by tests/vm/guest-init.sh on ttyS0):
#   VMTEST: <progress text>
#   VMTEST-VALUE: <key>=<value>
#   VMTEST-RESULT: PASS | FAIL <reason>

# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

vm_log() { printf '[vm] %s\n' "$*" >&2; }
vm_die() {
    printf '[vm] ERROR: %s\n' "$*" >&2
    exit 1
}

# The packages a guest test needs, by the command that proves each is installed.
vm_missing_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    # Not `grep -q`: it exits at the first match, and under `pipefail` the SIGPIPE busybox may
    # then get while still listing made this report busybox-static missing now and then (3 in
    # 1,000 calls on an idle machine, and once in a CI run).
    [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x blkdiscard >/dev/null \
        || missing+=(busybox-static)
    command -v nbd-client >/dev/null || [ -x /usr/sbin/nbd-client ] || missing+=(nbd-client)
    [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
    [ -n "$(vm_kernel 2>/dev/null)" ] || missing+=(linux-image-amd64)
    printf '%s\n' "${missing[@]}"
}

# The guest kernel: $VM_KERNEL, else the newest /boot/vmlinuz-* that has its modules installed.
vm_kernel() {
    if [ -n "${VM_KERNEL:-}" ]; then
        [ -r "$VM_KERNEL" ] || return 1
        echo "$VM_KERNEL"
        return
    fi
    local k best=""
    for k in /boot/vmlinuz-*; do
        [ -r "$k" ] || continue
        [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] || continue
        best=$k
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

vm_kernel_version() { local k; k=$(vm_kernel) && echo "${k#*/vmlinuz-}"; }

# Copy an executable or shared object to the same path under ROOT (or to DEST when given), with
# every library ldd names and the dynamic loader, so it runs in the guest.
vm_copy_with_libs() {
    local root=$1 src=$2 dest=${3:-$2}
    [ -e "$src" ] || vm_die "missing file to copy into the guest: $src"
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    local lib
    # ldd prints "name => /path (addr)" or "/path (addr)"; keep the absolute paths.
    for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# Copy the modules MODULE... need (dependencies first) and append their insmod lines to
# ROOT/modules.list ("path args"). Compressed modules are unpacked because busybox insmod
# reads plain .ko only.
vm_add_modules() {
    local root=$1 kver=$2
    shift 2
    local m line path args
    for m in "$@"; do
        modprobe -S "$kver" --show-depends "$m" >"$root/.deps" 2>/dev/null \
            || vm_die "module $m not found for kernel $kver"
        while read -r line; do
            case $line in
            builtin*) continue ;;
            insmod*) ;;
            *) continue ;;
            esac
            line=${line#insmod }
            path=${line%% *}
            args=""
            [ "$path" != "$line" ] && args=${line#* }
            local plain=${path%.xz}
            plain=${plain%.zst}
            plain=${plain%.gz}
            grep -q "^$plain\( \|$\)" "$root/modules.list" 2>/dev/null && continue
            mkdir -p "$root$(dirname "$plain")"
            case $path in
            *.xz) xz -dc "$path" >"$root$plain" ;;
            *.zst) zstd -qdc "$path" >"$root$plain" ;;
            *.gz) gzip -dc "$path" >"$root$plain" ;;
            *) cp "$path" "$root$plain" ;;
            esac
            echo "$plain $args" >>"$root/modules.list"
        done <"$root/.deps"
        rm -f "$root/.deps"
    done
}

# One newc cpio header plus name, padded to 4 bytes (no file data: directories and devices).
vm_cpio_entry() {
    local ino=$1 mode=$2 rmaj=$3 rmin=$4 name=$5
    local namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0
    printf '%s\0' "$name"
    local pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# Pack ROOT into a gzip'd newc cpio at OUT. /dev/console is written as a raw cpio entry, so
# the build needs no mknod (and no root): the kernel opens it before running /init.
vm_pack_initramfs() {
    local root=$1 out=$2
    {
        {
            vm_cpio_entry 1 $((0040755)) 0 0 dev
            vm_cpio_entry 2 $((0020600)) 5 1 dev/console
            vm_cpio_entry 0 0 0 0 'TRAILER!!!'
        } | gzip -1
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) \
            | gzip -1
    } >"$out"
}

# Remove carriage returns and terminal escape sequences (firmware and kernel print them).
vm_strip_console() {
    sed -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' -e 's/\x1b[()][A-Z0-9]//g' "$1"
}

# Boot the guest. Args: accel kernel initrd console-log timeout-seconds [extra qemu args...].
# Returns qemu's status (124 on timeout).
vm_boot() {
    local accel=$1 kernel=$2 initrd=$3 console=$4 tmo=$5
    shift 5
    local cpu=()
    [ "$accel" = kvm ] && cpu=(-cpu host)
    : >"$console"
    vm_log "booting $kernel with $accel (timeout ${tmo}s), console -> $console"
    timeout --kill-after=10 "$tmo" qemu-system-x86_64 \
        -accel "$accel" "${cpu[@]}" -m "${VM_MEM:-1024}" -smp 1 \
        -no-user-config -nodefaults -display none -no-reboot \
        -serial "file:$console" -nic none \
        -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 loglevel=4 ${VM_APPEND:-}" \
        "$@" </dev/null
}

# Pick "kvm" only when a guest really boots with it (nested KVM can hang or crash a stock
# kernel), else "tcg". $VM_ACCEL overrides. The probe boots a tiny initramfs once.
vm_pick_accel() {
    case ${VM_ACCEL:-auto} in
    kvm | tcg)
        echo "$VM_ACCEL"
        return
        ;;
    esac
    if [ ! -w /dev/kvm ]; then
        echo tcg
        return
    fi
    local d
    d=$(mktemp -d "${TMPDIR:-/tmp}/vm-probe.XXXXXX")
    mkdir -p "$d/root/bin"
    cp /bin/busybox "$d/root/bin/busybox"
    cat >"$d/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox echo VMPROBE-OK
/bin/busybox poweroff -f
EOF
    chmod +x "$d/root/init"
    vm_pack_initramfs "$d/root" "$d/probe.cpio.gz"
    local accel=tcg
    if vm_boot kvm "$(vm_kernel)" "$d/probe.cpio.gz" "$d/console.log" "${VM_PROBE_TIMEOUT:-20}" \
        >/dev/null 2>&1 && grep -q VMPROBE-OK "$d/console.log"; then
        accel=kvm
    fi
    rm -rf "$d"
    echo "$accel"
}

# Print the VMTEST lines of a console log (CR and escapes removed).
vm_results() { vm_strip_console "$1" | grep -a 'VMTEST' || true; }

# The value of "VMTEST-VALUE: KEY=..." in a console log (last one wins).
vm_value() {
    vm_strip_console "$1" | grep -a "^VMTEST-VALUE: $2=" | tail -n 1 | sed "s/^VMTEST-VALUE: $2=//"
}

# Exit 0 if the guest printed PASS, else print why and the console log, and return 1.
vm_check_pass() {
    local console=$1
    # grep reads to the end (no -q, -m or head): under pipefail a writer cut short by SIGPIPE
    # would turn a PASS into a failure (see vm_missing_packages).
    if vm_strip_console "$console" | grep -a '^VMTEST-RESULT: PASS' >/dev/null; then
        return 0
    fi
    local why
    why=$(vm_strip_console "$console" | grep -a '^VMTEST-RESULT: FAIL' || true)
    why=${why%%$'\n'*}
    [ -n "$why" ] || why="guest printed no result (hang, crash or timeout)"
    vm_log "guest test failed: $why"
    vm_log "console log: $console (last 60 lines follow)"
    vm_strip_console "$console" | tail -n 60 >&2
    return 1
}

# Mapped bytes of volume VOL from `thinnbd pool status` text on stdin. Accepts a line naming
# the volume with "mapped" followed by a number and an optional unit (B, KiB/K, MiB/M, GiB/G),
# e.g. "volume vol size=512MiB mapped=12582912" or "vol: mapped 12.0 MiB". The one place to
# adjust when the status format settles.
vm_parse_mapped() {
    awk -v vol="$1" '
    function unit(u) {
        u = toupper(u); if (u == "BYTES") return 1; sub(/I?B$/, "", u)
        if (u == "K") return 1024; if (u == "M") return 1048576
        if (u == "G") return 1073741824; if (u == "T") return 1099511627776
        return 1
    }
    BEGIN { v = vol; gsub(/\./, "[.]", v); named = "(^|[^a-z0-9_.-])" tolower(v) "([^a-z0-9_.-]|$)" }
    {
        line = tolower($0)
        if (line !~ named) next
        if (match(line, /mapped[^0-9]*[0-9][0-9.]*[ ]*(bytes|[kmgt]i?b|[kmgt]|b)?/)) {
            # A unit glued to more letters ("192 blocks") is not a size: print nothing.
            if (substr(line, RSTART + RLENGTH, 1) ~ /[a-z]/) exit
            s = substr(line, RSTART, RLENGTH)
            sub(/^mapped[^0-9]*/, "", s)
            n = s; sub(/[ a-z]*$/, "", n)
            u = s; sub(/^[0-9.]*[ ]*/, "", u)
            printf "%.0f\n", n * unit(u)
            exit
        }
    }'
}
