-- readonly_sql for OpenKM on PostgreSQL (the okm_config table).
--
-- hasync runs readonly_sql in the staging copy (NAME__hasync_new) after the
-- load and verification and before the swap, in one transaction, so the copy
-- that becomes the mirror's live database is read-only from its first moment.
-- Put each statement below into readonly_sql as one string. Checked:
--   * INSERT / UPDATE / DELETE / MERGE must change at least one row (an
--     UPDATE of a missing row "succeeds" and leaves the mirror writable);
--   * SELECT must return a true first value (1, t, true, yes, on); it runs
--     again on the live database after the swap;
--   * anything else must succeed.
-- Any failure stops the phase before the swap: the live database is untouched.

-- The system.readonly row is missing on a database that OpenKM never started:
-- insert it, or set it when it exists (an upsert, not an UPDATE).
INSERT INTO okm_config (cfg_key, cfg_type, cfg_value) VALUES ('system.readonly', 'boolean', 'true') ON CONFLICT (cfg_key) DO UPDATE SET cfg_value = 'true';

-- The check.
SELECT cfg_value = 'true' FROM okm_config WHERE cfg_key = 'system.readonly';
