//! The edgefleet control plane: storage, device identity, agent sessions and
//! telemetry, and the operator API. `edgefleet-server` is a thin binary over
//! [`server::start`].

pub mod agent_service;
pub mod backup;
pub mod config;
pub mod convert;
pub mod drift;
pub mod errors;
pub mod gate_figures;
pub mod group_commit;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod operator_service;
pub mod paging;
pub mod registry;
pub mod rollouts;
pub mod server;
pub mod server_tls;
pub mod sessions;
pub mod state;
pub mod store;
