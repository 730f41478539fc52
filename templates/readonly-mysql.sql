-- readonly_sql for OpenKM on MySQL / MariaDB (the OKM_CONFIG table).
--
-- hasync runs readonly_sql in the staging copy (NAME__hasync_new) after the
-- load and verification and before the swap, in one transaction, so the copy
-- that becomes the mirror's live database is read-only from its first moment.
-- Put each statement below into readonly_sql as one string. Checked:
--   * INSERT / UPDATE / REPLACE / DELETE must change at least one row (an
--     UPDATE of a missing row "succeeds" and leaves the mirror writable);
--   * SELECT must return a true first value (1, t, true, yes, on); it runs
--     again on the live database after the swap;
--   * anything else must succeed.
-- Any failure stops the phase before the swap: the live database is untouched.

-- The system.readonly row is missing on a database that OpenKM never started:
-- insert it, or set it when it exists (an upsert, not an UPDATE).
INSERT INTO OKM_CONFIG (CFG_KEY, CFG_TYPE, CFG_VALUE) VALUES ('system.readonly', 'boolean', 'true') ON DUPLICATE KEY UPDATE CFG_VALUE = 'true';

-- The check.
SELECT CFG_VALUE = 'true' FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly';
