#!/bin/bash
# dracut module "keel": adds `initstage prepare` to a systemd initrd (keel-prepare.service,
# before initrd-root-fs.target), so a dracut-built initramfs boots a keel image with promotion,
# trial boots and rollback. Install this directory as /usr/lib/dracut/modules.d/90keel and
# `initstage` as /usr/bin/initstage, put the image signers' public keys in
# /etc/keel/trusted.pem, then `dracut --add keel ...`.

check() {
    require_binaries initstage || return 1
    # Only when asked for: `--add keel` or add_dracutmodules+=" keel ".
    return 255
}

depends() {
    echo systemd-initrd
    return 0
}

installkernel() {
    # What `initstage prepare` mounts: the image (squashfs or erofs, on a loop device when it
    # is a file on img), the overlay, and the partitions' file systems.
    hostonly='' instmods loop squashfs erofs overlay ext4
}

install() {
    if [[ ! -f /etc/keel/trusted.pem ]]; then
        dfatal "keel: /etc/keel/trusted.pem is missing: without the signers' keys initstage cannot check a staged image (put the public keys from \`keelctl keygen\` there)"
        return 1
    fi
    inst_binary initstage /usr/bin/initstage
    inst_simple /etc/keel/trusted.pem
    inst_simple "$moddir/keel-prepare.service" "$systemdsystemunitdir/keel-prepare.service"
    mkdir -p "$initdir/etc/modules-load.d"
    printf '%s\n' loop squashfs erofs overlay > "$initdir/etc/modules-load.d/keel.conf"
    $SYSTEMCTL -q --root "$initdir" enable keel-prepare.service
}
