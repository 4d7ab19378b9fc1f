//! A hand-driven HTTP/2 client's pieces, for tests that need a client
//! misbehaving in ways a real HTTP/2 stack never would (going silent
//! mid-message, never answering a ping).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
/// The ACK flag of SETTINGS and PING frames.
pub const ACK: u8 = 0x1;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// One frame: 9 bytes of header (length, type, flags, stream), then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// The client's connection preface, its (empty) SETTINGS, and the
/// acknowledgement of the server's: a connection the server takes as open.
pub fn opening() -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(SETTINGS, ACK, 0, &[]));
    bytes
}

/// Writes `bytes`, then reads (and ignores, answering nothing) what the
/// server sends until it closes the connection. `None` if it is still open
/// after `timeout`; else whether the server pinged it first.
pub async fn silent_until_closed(
    socket: &mut TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> Option<bool> {
    socket.write_all(bytes).await.unwrap();
    let mut pinged = false;
    tokio::time::timeout(timeout, async {
        loop {
            let mut head = [0u8; 9];
            if socket.read_exact(&mut head).await.is_err() {
                return;
            }
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            if socket.read_exact(&mut payload).await.is_err() {
                return;
            }
            // A ping from the server, not the acknowledgement of one.
            pinged |= head[3] == PING && head[4] & ACK == 0;
        }
    })
    .await
    .ok()
    .map(|()| pinged)
}
