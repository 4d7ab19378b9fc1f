//! What a caller is told when the server's own storage fails: the status
//! code, and a generic message. The detail (a database's error text names
//! tables, constraints, hosts; a blob store's names paths) goes to the
//! server log only. Every handler turns storage failures into statuses
//! here, so no detail reaches agents or operators by another path.

use std::fmt::Display;

use tonic::{Code, Status};

/// The message of every status caused by a failure of the server's storage
/// (database or blob store).
pub const STORAGE_ERROR_MESSAGE: &str = "internal storage error; see the server log";

/// The status a caller gets for a storage failure whose detail is already in
/// the server log (e.g. a telemetry group commit logs its failure once for
/// all the sessions waiting on it).
pub fn storage_status(code: Code) -> Status {
    Status::new(code, STORAGE_ERROR_MESSAGE)
}

/// Logs a storage failure (`err`, while `doing` something) and returns the
/// status the caller gets: `code` with [`STORAGE_ERROR_MESSAGE`].
pub fn storage_error(code: Code, doing: &str, err: &dyn Display) -> Status {
    tracing::error!(error = %err, "{doing}");
    storage_status(code)
}

/// For `.map_err(store_unavailable("cannot read the device"))`: a database
/// failure as UNAVAILABLE (the caller may retry), logged with what was
/// being done.
pub fn store_unavailable<E: Display>(doing: &'static str) -> impl FnOnce(E) -> Status {
    move |err| storage_error(Code::Unavailable, doing, &err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_get_the_code_and_a_generic_message_only() {
        let err = std::io::Error::other("relation \"devices\" does not exist at /var/lib/secret");
        let status = store_unavailable("cannot read the device")(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), STORAGE_ERROR_MESSAGE);
        let status = storage_error(Code::Internal, "cannot read a blob", &"/var/lib/x: EIO");
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), STORAGE_ERROR_MESSAGE);
    }
}
