-- A renewal retires the device's certificate, but not at once: the agent
-- installs the new one only once it has received it, so the certificate the
-- renewing session presented stays accepted until the device opens a
-- session with the new one (then this column is cleared). NULL: only
-- `certificate_serial` is accepted.
ALTER TABLE devices ADD COLUMN previous_certificate_serial TEXT;
