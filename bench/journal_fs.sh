#!/usr/bin/env bash
# bench/journal_fs.sh: a journaled ext4 for the SMTP benchmarks, on a loop device (root only).
#
#   bench/journal_fs.sh up [DIR]      # make an 8 GiB sparse image, mkfs.ext4, mount it on DIR
#   bench/journal_fs.sh down [DIR]    # unmount it and remove the image
#   TMPDIR_BASE=DIR bench/smtp.sh     # then every target's queue and Maildir live on it
#
# Why: a machine whose root file system is ext4 without a journal (as some cloud images are)
# skips every recently freed inode when it allocates one (ext4's recently_deleted(), checked
# only when there is no journal), and the harness deletes each target's messages between
# rounds, so a target's figure there depends on where its folders happen to land.  A mail
# server's disk has a journal (ext4's default, XFS); measuring on one is measuring the case
# that users run.  Postfix and mailsuite share the same file system, so the ratio stays fair.
# The loop device passes every flush (fsync, journal commit) down to the image file, so an
# fsync still reaches the disk.
set -euo pipefail
DIR=${2:-/mnt/mailsuite-benchfs}
IMG=${IMG:-/var/tmp/mailsuite-benchfs.img}
case ${1:-} in
    up)
        if mountpoint -q "$DIR"; then echo "$DIR is already mounted"; exit 0; fi
        truncate -s "${SIZE:-8G}" "$IMG"
        mkfs.ext4 -q -F "$IMG"   # the default features: has_journal, data=ordered
        mkdir -p "$DIR"
        mount -o loop "$IMG" "$DIR"
        chmod 755 "$DIR"   # Postfix's virtual(8) delivers as the benchmark uid below it
        df -T "$DIR" | tail -1
        ;;
    down)
        mountpoint -q "$DIR" && umount "$DIR"
        rm -f "$IMG"
        ;;
    *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac
