// Runs once, on an empty data directory (docker-entrypoint-initdb.d), as the root user.
// Each service gets a user whose roles cover only its own database and the swamp_bus queues:
// the app cannot touch telemetry's data, and the reverse. dbAdmin on the bus: at start-up each
// service ensures the queue indexes, and a changed QUEUE_DONE_RETENTION_SECONDS is applied to
// the TTL index with collMod, which readWrite does not allow (tests/test_compose.py checks the
// roles against the commands the services really send).
const env = process.env;
const bus = env.BUS_DB || "swamp_bus";

db.getSiblingDB("admin").createUser({
  user: env.TELEMETRY_DB_USER,
  pwd: env.TELEMETRY_DB_PASSWORD,
  roles: [
    { role: "readWrite", db: env.TELEMETRY_DB || "telemetry" },
    { role: "readWrite", db: bus },
    { role: "dbAdmin", db: bus },
  ],
});

db.getSiblingDB("admin").createUser({
  user: env.APP_DB_USER,
  pwd: env.APP_DB_PASSWORD,
  roles: [
    { role: "readWrite", db: env.APP_DB || "swamp_club" },
    { role: "readWrite", db: bus },
    { role: "dbAdmin", db: bus },
  ],
});
