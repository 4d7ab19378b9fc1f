//! Managed mode: the agent enrolled in a fleet. Enrollment, the state
//! directory, the session stream to the control plane, and model delivery.

pub mod backoff;
pub mod delivery;
pub mod enroll;
pub mod session;
pub mod state;
