//! `edgefleet`: the operator CLI over the control plane's gRPC API.

fn main() {}
