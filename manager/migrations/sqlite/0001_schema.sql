-- The schema as SQLite databases made before migrations were tracked have
-- it: every statement is IF NOT EXISTS, so such a database takes this as
-- already applied.
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, password_sha256 TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]', created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_state (
    device_id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT, reported TEXT, health TEXT);
CREATE TABLE IF NOT EXISTS releases (
    service TEXT NOT NULL, version TEXT NOT NULL, sequence INTEGER NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, envelope TEXT NOT NULL,
    created TEXT NOT NULL, PRIMARY KEY (service, version));
CREATE TABLE IF NOT EXISTS desired (device_id TEXT PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
    version TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployment_devices (
    deployment_id INTEGER NOT NULL, device_id TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, updated TEXT NOT NULL, PRIMARY KEY (deployment_id, device_id));
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,
    kind TEXT NOT NULL, time TEXT NOT NULL, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_device ON history (device_id, kind, id);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
    version TEXT NOT NULL, plan TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY, scope TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (
    version INTEGER PRIMARY KEY, signed TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id INTEGER NOT NULL, device_id TEXT NOT NULL,
    position INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT,
    sent_at TEXT, updated TEXT NOT NULL, PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS enrolments (
    device_id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_keys (
    device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_certs (
    serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, not_after INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS device_certs_by_device ON device_certs (device_id);
CREATE INDEX IF NOT EXISTS device_certs_by_expiry ON device_certs (not_after);
