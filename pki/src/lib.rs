//! The fleet's public-key infrastructure: the certificate authority, device
//! enrollment (CSR in, certificate out), join tokens, and the rustls
//! configurations of mutual TLS between agents and the control plane.
