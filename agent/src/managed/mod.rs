//! Managed mode: the agent enrolled in a fleet. Enrollment, the state
//! directory, and the session stream to the control plane.

pub mod backoff;
pub mod enroll;
pub mod session;
pub mod state;
