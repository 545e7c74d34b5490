// The mongo service's healthcheck: initiate the replica set on first run, then report healthy
// only once a primary exists. The root password comes from the container's environment, never
// from the command line (where `ps` and `docker inspect` would show it).
const admin = db.getSiblingDB("admin");
admin.auth("root", process.env.MONGO_INITDB_ROOT_PASSWORD);
try {
  rs.status();
} catch (e) {
  rs.initiate({ _id: "rs0", members: [{ _id: 0, host: "mongo:27017" }] });
}
quit(db.hello().isWritablePrimary ? 0 : 1);
