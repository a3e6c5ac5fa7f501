-- Which of a device's certificates was issued last, without SQLite's rowid
-- (the PostgreSQL schema has no such thing): a per-device counter.
ALTER TABLE device_certs ADD COLUMN issued INTEGER NOT NULL DEFAULT 0;
UPDATE device_certs SET issued = rowid;
