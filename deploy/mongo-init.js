// Runs once, on an empty data directory (docker-entrypoint-initdb.d), as the root user.
// Each service gets a user whose roles cover only its own database and the swamp_bus queues
// (SPEC section 2): the app cannot touch telemetry's data, and the reverse.
const env = process.env;
const bus = env.BUS_DB || "swamp_bus";

db.getSiblingDB("admin").createUser({
  user: env.TELEMETRY_DB_USER,
  pwd: env.TELEMETRY_DB_PASSWORD,
  roles: [
    { role: "readWrite", db: env.TELEMETRY_DB || "telemetry" },
    { role: "readWrite", db: bus },
  ],
});

db.getSiblingDB("admin").createUser({
  user: env.APP_DB_USER,
  pwd: env.APP_DB_PASSWORD,
  roles: [
    { role: "readWrite", db: env.APP_DB || "swamp_club" },
    { role: "readWrite", db: bus },
  ],
});
