#!/usr/bin/env bash
# A node's own cache folder ($WSML_CACHE: the raw image cache, LinearInit's features) on its fastest disk.
#
#   bash scripts/local_cache.sh /mnt/wsml-cache      # in cluster.yaml's set-up, on every node
#
# EC2's GPU instances (g5, g6, g6e, p4d, p5, ...) come with NVMe instance-store SSDs, far faster
# than the root EBS volume (gp3: 125 MiB/s unless provisioned higher), and empty at every boot.
# The Deep Learning AMIs mount them at /opt/dlami/nvme (a RAID 0 over several); then DIR is a
# folder there, bind-mounted at DIR. Otherwise the first instance-store device that is not in use
# is formatted (ext4) and mounted at DIR. Without instance store (the head), DIR is a folder on the
# root volume. Idempotent: a DIR that is a mount point already is left as it is.
set -euo pipefail
dir=${1:?usage: bash scripts/local_cache.sh DIR}
owner="$(id -u):$(id -g)"
if mountpoint -q "$dir"; then
  echo "local cache: $dir is mounted already"
  exit 0
fi
sudo mkdir -p "$dir"
if mountpoint -q /opt/dlami/nvme; then
  sudo mkdir -p /opt/dlami/nvme/wsml-cache
  sudo chown "$owner" /opt/dlami/nvme/wsml-cache
  sudo mount --bind /opt/dlami/nvme/wsml-cache "$dir"
  echo "local cache: $dir on the instance store (/opt/dlami/nvme)"
  exit 0
fi
dev=""
for d in $(lsblk -dpno NAME,MODEL | awk '/Instance Storage/ {print $1}'); do
  if [ -z "$(lsblk -no MOUNTPOINT "$d" | tr -d '[:space:]')" ] && ! grep -q "^$d" /proc/swaps; then
    dev=$d
    break
  fi
done
if [ -n "$dev" ]; then
  sudo mkfs.ext4 -q -F -m 0 -E nodiscard "$dev"
  sudo mount -o noatime "$dev" "$dir"
  sudo chown "$owner" "$dir"
  echo "local cache: $dir on the instance store $dev ($(lsblk -dno SIZE "$dev" | tr -d ' '))"
else
  sudo chown "$owner" "$dir"
  echo "local cache: no free instance store: $dir is on the root volume"
fi
