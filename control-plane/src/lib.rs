//! The edgefleet control plane, as a library: `edgefleet-server` is a thin
//! shell over it, and tests run the real server in-process or as a process.

pub mod store;
