//! Arbitrary messages from the control plane to an agent in managed mode:
//! desired states, commands, certificates, acknowledgements, Welcomes, as
//! length-delimited `ControlMessage`s after the session's Welcome, sent to
//! the agent's real session, delivery and registry code in this process
//! (see `edgefleet_fuzz::agent_session`). The control plane is trusted, but
//! the agent must never fall over on what it sends: a panic anywhere, or an
//! agent that does not come back for its next session, is a finding.
#![no_main]

use edgefleet_fuzz::agent_session::agent_session;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixture = agent_session();
    let messages = fixture.messages(data);
    fixture.run(messages);
});
