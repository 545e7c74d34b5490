#!/bin/sh
# A replica set with authentication needs a keyfile shared by its members (one member here).
set -eu
if [ ! -f /data/configdb/keyfile ]; then
  head -c 756 /dev/urandom | base64 > /data/configdb/keyfile
  chmod 400 /data/configdb/keyfile
  chown mongodb:mongodb /data/configdb/keyfile
fi
exec docker-entrypoint.sh mongod --replSet rs0 --bind_ip_all --keyFile /data/configdb/keyfile
