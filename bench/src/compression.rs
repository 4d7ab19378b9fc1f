//! What compressed HTTP answers (`--compress-http-answers`) cost the agent
//! and save on the wire: the same JSON inference request answered plain,
//! gzip and deflate by one agent, in interleaved blocks, for a small and a
//! large answer.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::Args;
use crate::agent_process::AgentProcess;

/// The encodings compared; the first is the reference.
const ENCODINGS: [&str; 3] = ["identity", "gzip", "deflate"];

/// Rounds of one block per encoding, interleaved so that drift in the
/// machine's speed falls on all of them alike.
const ROUNDS: usize = 5;

/// Values per answer: `dynamic` answers `y = 2x + 1` of the request's shape
/// (and the row sums): about 3 KB and 50 KB of JSON.
const SIZES: [usize; 2] = [256, 4096];

/// Per encoding: request latency, the agent's CPU time, the answer's bytes.
struct Measured {
    latency: Histogram<u64>,
    agent_cpu: Duration,
    requests: u64,
    bytes: usize,
}

pub async fn compression(args: &Args) -> anyhow::Result<String> {
    let agent = AgentProcess::start_with(
        &args.agent,
        &args.fixtures,
        "tract",
        &["--compress-http-answers"],
    )
    .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let url = format!("http://{}/v2/models/dynamic/infer", agent.http_addr);
    let per_block = (args.iterations / ROUNDS).max(20);
    let mut out = String::new();
    writeln!(
        out,
        "## Compressed HTTP answers\n\n\
         One agent started with `--compress-http-answers` (tract) answers the \
         same JSON request to the `dynamic` fixture (`y = 2x + 1`, so the \
         answer is as large as the request) plain, gzip and deflate, as the \
         client's `Accept-Encoding` asks; {ROUNDS} interleaved blocks of \
         {per_block} sequential requests per encoding over one kept-alive \
         connection, the answer read whole (not decompressed). Agent CPU: \
         its threads' scheduler time over the blocks, per request.\n"
    )?;
    writeln!(
        out,
        "| values | encoding | answer bytes | p50 µs | p99 µs | agent CPU µs/request | p50 vs plain | CPU vs plain |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|")?;
    for values in SIZES {
        // Shared, not copied, by every request.
        let body = bytes::Bytes::from(request_body(values));
        let mut measured: Vec<Measured> = ENCODINGS
            .iter()
            .map(|_| Measured {
                latency: Histogram::new(3).expect("3 significant digits"),
                agent_cpu: Duration::ZERO,
                requests: 0,
                bytes: 0,
            })
            .collect();
        // Warm-up: connections, allocator, the model's first runs.
        for encoding in ENCODINGS {
            for _ in 0..20 {
                answer(&client, &url, &body, encoding).await?;
            }
        }
        for _ in 0..ROUNDS {
            for (encoding, m) in ENCODINGS.iter().zip(&mut measured) {
                let cpu_before = agent.cpu_time()?;
                for _ in 0..per_block {
                    let started = Instant::now();
                    let bytes = answer(&client, &url, &body, encoding).await?;
                    m.latency
                        .record(started.elapsed().as_micros().max(1) as u64)?;
                    m.bytes = bytes;
                    m.requests += 1;
                }
                let cpu = agent.cpu_time()? - cpu_before;
                m.agent_cpu += cpu.model + cpu.rest;
            }
        }
        let plain_p50 = measured[0].latency.value_at_quantile(0.5) as f64;
        let plain_cpu = cpu_per_request(&measured[0]);
        for (encoding, m) in ENCODINGS.iter().zip(&measured) {
            let p50 = m.latency.value_at_quantile(0.5);
            let cpu = cpu_per_request(m);
            writeln!(
                out,
                "| {values} | {encoding} | {} | {p50} | {} | {cpu:.0} | {:.2}× | {:.2}× |",
                m.bytes,
                m.latency.value_at_quantile(0.99),
                p50 as f64 / plain_p50,
                cpu / plain_cpu,
            )?;
        }
    }
    Ok(out)
}

fn cpu_per_request(m: &Measured) -> f64 {
    m.agent_cpu.as_secs_f64() * 1e6 / m.requests.max(1) as f64
}

/// A request for one row of `values` FP32 values that do not repeat a
/// pattern (xorshift), written with 6 decimals as clients write floats.
fn request_body(values: usize) -> String {
    let mut state = 0x2545_f491u32;
    let data: Vec<String> = (0..values)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            format!("{:.6}", f64::from(state) / f64::from(u32::MAX))
        })
        .collect();
    format!(
        r#"{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1,{values}],"data":[{}]}}]}}"#,
        data.join(",")
    )
}

/// One inference asking for `encoding`; the answer's size as it came.
async fn answer(
    client: &reqwest::Client,
    url: &str,
    body: &bytes::Bytes,
    encoding: &str,
) -> anyhow::Result<usize> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept-encoding", encoding)
        .body(body.clone())
        .send()
        .await?;
    let status = response.status();
    let came_as = response
        .headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .unwrap_or_else(|| "identity".into());
    let bytes = response.bytes().await?;
    anyhow::ensure!(status == 200, "status {status}");
    anyhow::ensure!(
        came_as == encoding,
        "asked for {encoding}, the answer came as {came_as}"
    );
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_has_the_values_asked_for() {
        let body = request_body(5);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["inputs"][0]["data"].as_array().unwrap().len(), 5);
        assert_eq!(json["inputs"][0]["shape"], serde_json::json!([1, 5]));
    }
}
