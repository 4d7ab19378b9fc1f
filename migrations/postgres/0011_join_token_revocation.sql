-- An operator can revoke a join token (`RevokeJoinToken`): from then on it
-- enrolls no device. NULL: not revoked.
ALTER TABLE join_tokens ADD COLUMN revoked_at BIGINT;
