//! Reading an HTTP infer request's body: within the request limit, counted
//! decompressed; gzip or deflate as its `Content-Encoding` says (as Triton
//! takes them, and `tritonclient.http` sends them with
//! `request_compression_algorithm`); split into the JSON and the binary
//! tensor data after it, that data aligned for the runtimes.

use std::io::{self, Write};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use flate2::write::{GzDecoder, ZlibDecoder};
use tokio_stream::StreamExt;

use crate::error::{ErrorCode, InferError};

/// The alignment of the binary tensor data in a request's buffer: enough
/// for any element type, so a runtime reads each tensor where it landed
/// (one that starts misaligned, after a tensor whose size is not a multiple
/// of it, is copied aligned by the runtime).
pub const BINARY_DATA_ALIGN: usize = 16;

/// Reads a request body of at most `limit` bytes (decompressed), and splits
/// it into its JSON (the first `json_length` bytes, from
/// `Inference-Header-Content-Length`, which counts the decompressed JSON)
/// and the binary tensor data after it (none without a length). A body on
/// which nothing arrives for `stall_timeout` is given up (TimedOut, 408):
/// its client stalled or vanished, and what it sent is not held forever.
pub async fn read_body(
    headers: &HeaderMap,
    json_length: Option<usize>,
    body: Body,
    limit: usize,
    stall_timeout: Duration,
) -> Result<(Bytes, Bytes), InferError> {
    let coding = ContentCoding::of(headers)?;
    let too_large = || {
        InferError::new(
            ErrorCode::TooLarge,
            format!("request body is over the limit of {limit} bytes"),
        )
    };
    // Appended to one buffer sized from Content-Length when the request
    // gives it: collecting the frames first and then joining them would
    // hold the body twice. With binary tensor data, the body starts a few
    // bytes in, so that the data after the JSON lands aligned.
    let declared = usize::try_from(body.size_hint().exact().unwrap_or(0)).unwrap_or(usize::MAX);
    if declared > limit {
        return Err(too_large());
    }
    let room_to_align = if json_length.is_some() {
        BINARY_DATA_ALIGN
    } else {
        0
    };
    let mut bytes = Vec::<u8>::with_capacity(declared.saturating_add(room_to_align));
    let start = json_length.map_or(0, |length| {
        bytes
            .as_ptr()
            .wrapping_add(length)
            .align_offset(BINARY_DATA_ALIGN)
            .min(BINARY_DATA_ALIGN)
    });
    bytes.resize(start, 0);
    let buffer = Capped {
        bytes,
        cap: start.saturating_add(limit),
    };
    let mut decoder = coding.decoder(buffer);
    let mut frames = body.into_data_stream();
    let mut received = 0usize;
    loop {
        let Ok(frame) = tokio::time::timeout(stall_timeout, frames.next()).await else {
            return Err(InferError::new(
                ErrorCode::TimedOut,
                format!(
                    "the request body stalled: nothing arrived for {} after {received} bytes",
                    humantime::format_duration(stall_timeout)
                ),
            ));
        };
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|err| InferError::invalid(format!("cannot read the request body: {err}")))?;
        received = received.saturating_add(frame.len());
        decoder
            .write_all(&frame)
            .map_err(|err| coding.error(err, too_large))?;
    }
    let bytes = decoder
        .finish()
        .map_err(|err| coding.error(err, too_large))?
        .bytes;
    let mut json = Bytes::from(bytes).slice(start..);
    let binary = match json_length {
        Some(length) if length > json.len() => {
            return Err(InferError::invalid(format!(
                "Inference-Header-Content-Length says the JSON is {length} bytes, \
                 but the body has only {}",
                json.len()
            )));
        }
        Some(length) => json.split_off(length),
        None => Bytes::new(),
    };
    Ok((json, binary))
}

/// How a request body is encoded (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentCoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: the zlib format (RFC 1950), as Triton and
    /// `tritonclient` take it.
    Deflate,
}

impl ContentCoding {
    fn of(headers: &HeaderMap) -> Result<Self, InferError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Self::Identity);
        };
        let coding = value.to_str().ok().map(str::trim);
        match coding {
            Some(c) if c.is_empty() || c.eq_ignore_ascii_case("identity") => Ok(Self::Identity),
            Some(c) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
                Ok(Self::Gzip)
            }
            Some(c) if c.eq_ignore_ascii_case("deflate") => Ok(Self::Deflate),
            _ => Err(InferError::invalid(format!(
                "Content-Encoding {value:?} is not supported: send the request uncompressed, \
                 gzip or deflate"
            ))),
        }
    }

    fn decoder(self, buffer: Capped) -> Decoder {
        match self {
            Self::Identity => Decoder::Identity(buffer),
            Self::Gzip => Decoder::Gzip(GzDecoder::new(buffer)),
            Self::Deflate => Decoder::Deflate(ZlibDecoder::new(buffer)),
        }
    }

    /// The error for a body that failed to decode: over the limit, or not
    /// what its encoding says.
    fn error(self, err: io::Error, too_large: impl FnOnce() -> InferError) -> InferError {
        if err.get_ref().is_some_and(|inner| inner.is::<OverCap>()) {
            return too_large();
        }
        let name = match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        };
        InferError::invalid(format!(
            "cannot decompress the request body (Content-Encoding {name}): {err}"
        ))
    }
}

/// Writes a body's bytes, decompressing them as its encoding says.
enum Decoder {
    Identity(Capped),
    Gzip(GzDecoder<Capped>),
    Deflate(ZlibDecoder<Capped>),
}

impl Decoder {
    fn write_all(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Self::Identity(buffer) => buffer.write_all(frame),
            Self::Gzip(decoder) => decoder.write_all(frame),
            Self::Deflate(decoder) => decoder.write_all(frame),
        }
    }

    /// The whole body, once its compressed stream is known to be complete
    /// (its end and checksum read).
    fn finish(self) -> io::Result<Capped> {
        match self {
            Self::Identity(buffer) => Ok(buffer),
            Self::Gzip(decoder) => decoder.finish(),
            Self::Deflate(decoder) => decoder.finish(),
        }
    }
}

/// A buffer that refuses to grow past `cap` bytes: a small compressed body
/// cannot inflate past the request limit.
struct Capped {
    bytes: Vec<u8>,
    cap: usize,
}

#[derive(Debug)]
struct OverCap;

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("over the request limit")
    }
}

impl std::error::Error for OverCap {}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.cap - self.bytes.len() {
            return Err(io::Error::other(OverCap));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::INFERENCE_HEADER_CONTENT_LENGTH;
    use axum::http::HeaderValue;
    use flate2::Compression;
    use flate2::write::{GzEncoder, ZlibEncoder};

    /// Long enough that no test body stalls.
    const STALL: Duration = Duration::from_secs(60);

    /// The binary tensor data after the JSON lands 16-byte aligned in the
    /// request's buffer whatever the JSON's length, so runtimes read it in
    /// place; the JSON and the data come out whole.
    #[tokio::test]
    async fn binary_data_lands_aligned_after_json_of_any_length() {
        for json_length in 0..48 {
            let json = vec![b' '; json_length];
            let data: Vec<u8> = (0..100u8).collect();
            let mut headers = HeaderMap::new();
            headers.insert(
                INFERENCE_HEADER_CONTENT_LENGTH,
                HeaderValue::from(json_length),
            );
            let body = Body::from([json.clone(), data.clone()].concat());
            let (got_json, binary) = read_body(&headers, Some(json_length), body, 1 << 20, STALL)
                .await
                .unwrap();
            assert_eq!(got_json, json);
            assert_eq!(binary, data);
            assert_eq!(
                binary.as_ptr() as usize % BINARY_DATA_ALIGN,
                0,
                "JSON of {json_length} bytes"
            );
        }
        // The limit counts the body, not the alignment bytes before it.
        let mut headers = HeaderMap::new();
        headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(3));
        let exact = read_body(&headers, Some(3), Body::from(vec![b' '; 64]), 64, STALL).await;
        assert!(exact.is_ok());
        let over = read_body(&headers, Some(3), Body::from(vec![b' '; 65]), 64, STALL).await;
        assert_eq!(over.unwrap_err().code, ErrorCode::TooLarge);
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn zlib(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn encoded(coding: &'static str, json_length: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
        headers.insert(
            INFERENCE_HEADER_CONTENT_LENGTH,
            HeaderValue::from(json_length),
        );
        headers
    }

    /// A body sent in several frames, as a client streams it.
    fn in_frames(bytes: Vec<u8>, frame: usize) -> Body {
        let frames: Vec<Result<Bytes, io::Error>> = bytes
            .chunks(frame)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        Body::from_stream(tokio_stream::iter(frames))
    }

    #[tokio::test]
    async fn gzip_and_deflate_bodies_decode_whole_and_aligned() {
        let json = br#"{"inputs":[]}"#.to_vec();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let plain = [json.clone(), data.clone()].concat();
        for (coding, body) in [
            ("gzip", gzip(&plain)),
            ("GZIP", gzip(&plain)),
            ("x-gzip", gzip(&plain)),
            ("deflate", zlib(&plain)),
        ] {
            for frame in [1, 7, 4096, body.len()] {
                let (got_json, binary) = read_body(
                    &encoded(coding, json.len()),
                    Some(json.len()),
                    in_frames(body.clone(), frame),
                    plain.len(),
                    STALL,
                )
                .await
                .unwrap_or_else(|err| panic!("{coding} in {frame}-byte frames: {err:?}"));
                assert_eq!(got_json, json, "{coding}");
                assert_eq!(binary, data, "{coding}");
                assert_eq!(binary.as_ptr() as usize % BINARY_DATA_ALIGN, 0, "{coding}");
            }
        }
    }

    /// The limit holds for what a body inflates to, however small it is
    /// compressed: a zip bomb is refused before it fills memory.
    #[tokio::test]
    async fn the_limit_counts_the_decompressed_body() {
        let plain = vec![b' '; 1 << 20];
        let bomb = gzip(&plain);
        assert!(bomb.len() < 4096, "compresses to {} bytes", bomb.len());
        let over = read_body(
            &encoded("gzip", 0),
            Some(0),
            Body::from(bomb.clone()),
            65_536,
            STALL,
        )
        .await;
        let err = over.unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge, "{}", err.message);
        assert!(err.message.contains("65536"), "{}", err.message);
        let exact = read_body(
            &encoded("gzip", 0),
            Some(0),
            Body::from(bomb),
            1 << 20,
            STALL,
        )
        .await;
        assert_eq!(exact.unwrap().1.len(), 1 << 20);
    }

    /// The error reading `body` as `coding` ends in.
    async fn refused(coding: &'static str, body: Vec<u8>) -> InferError {
        read_body(&encoded(coding, 0), None, Body::from(body), 1 << 20, STALL)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn truncated_corrupt_and_unknown_encodings_are_refused() {
        let plain = br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}"#;
        for (coding, body) in [("gzip", gzip(plain)), ("deflate", zlib(plain))] {
            let truncated = body[..body.len() - 5].to_vec();
            let err = refused(coding, truncated).await;
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(
                err.message.starts_with(&format!(
                    "cannot decompress the request body (Content-Encoding {coding})"
                )),
                "{}",
                err.message
            );
            let mut corrupt = body.clone();
            let middle = corrupt.len() / 2;
            corrupt[middle] ^= 0xff;
            let err = refused(coding, corrupt).await;
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{}", err.message);
        }
        // Not compressed at all, though the header says so.
        let err = refused("gzip", plain.to_vec()).await;
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{}", err.message);
        let err = refused("br", plain.to_vec()).await;
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("not supported"), "{}", err.message);
    }

    /// A body on which nothing arrives for the stall timeout is given up,
    /// saying how much had come; one that keeps arriving, however slowly
    /// in all, is read whole.
    #[tokio::test]
    async fn a_stalled_body_times_out_and_a_slow_one_does_not() {
        let frame = |bytes: &'static [u8]| Ok::<_, std::io::Error>(Bytes::from_static(bytes));
        let stalled = futures::stream::iter([frame(b"{\"inp")]).chain(futures::stream::pending());
        let stall = Duration::from_millis(200);
        let err = read_body(
            &HeaderMap::new(),
            None,
            Body::from_stream(stalled),
            1 << 20,
            stall,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TimedOut);
        assert_eq!(
            err.message,
            "the request body stalled: nothing arrived for 200ms after 5 bytes"
        );
        // Ten frames 50 ms apart: half a second in all, never 200 ms without one.
        let slow = futures::stream::iter(0..10).then(move |_| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            frame(b"0123456789")
        });
        let (json, _) = read_body(
            &HeaderMap::new(),
            None,
            Body::from_stream(slow),
            1 << 20,
            stall,
        )
        .await
        .unwrap();
        assert_eq!(json.len(), 100);
    }
}
