//! Hostile input on the wire (section 3 of RELIABILITY.md): a flood of 100,000 distinct `header:`
//! keys, and malformed or huge `grpc-status` / `grpc-message` from a raw HTTP/2 upstream.

use super::*;

use std::net::Ipv4Addr;

use e2e::{raw_grpc, UpstreamPorts};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::{http, Bytes};

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Admin `/memory`: tcmalloc's `allocated` bytes (Envoy's own heap; the wasm VMs' memory is not in it).
async fn heap_allocated(envoy: &Envoy) -> u64 {
    let body = envoy.admin_get("/memory").await.unwrap().json().unwrap();
    body["allocated"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| body["allocated"].as_u64())
        .unwrap_or(0)
}

const FLOOD_KEYS: usize = 100_000;

const FLOOD_MAX_UPSTREAMS: usize = 64;

/// Keep-alive HTTP/1.1 connections, each sending its requests pipelined in batches: the cheapest
/// client there is, so the flood measures Envoy and not the (debug-built) test client.
const FLOOD_CONNECTIONS: usize = 16;

const FLOOD_BATCH: usize = 50;

/// One response read off a pipelined connection: its status, and how many bytes it took.
fn parse_one(buf: &[u8]) -> Option<(u16, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some((status, head_end + length))
}

/// Sends `GET /flood` once for each tenant in `tenants` over one connection, `FLOOD_BATCH` requests
/// pipelined at a time. Returns the statuses that were not 200.
async fn flood_connection(addr: SocketAddr, tenants: Vec<usize>) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut not_ok = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    for batch in tenants.chunks(FLOOD_BATCH) {
        let mut requests = String::with_capacity(batch.len() * 80);
        for n in batch {
            requests.push_str(&format!(
                "GET /flood HTTP/1.1\r\nhost: flood\r\nx-tenant: tenant-{n}\r\n\r\n"
            ));
        }
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut answered = 0;
        while answered < batch.len() {
            while let Some((status, used)) = parse_one(&buf) {
                buf.drain(..used);
                answered += 1;
                if status != 200 {
                    not_ok.push(status);
                }
            }
            if answered == batch.len() {
                break;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = bounded("pipelined responses", stream.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "Envoy closed a flood connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    not_ok
}

/// One request for each tenant in `range`, spread over `FLOOD_CONNECTIONS` connections.
async fn flood(addr: SocketAddr, range: std::ops::Range<usize>) -> Vec<u16> {
    let tasks: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|c| {
            let tenants: Vec<usize> = range.clone().skip(c).step_by(FLOOD_CONNECTIONS).collect();
            tokio::spawn(flood_connection(addr, tenants))
        })
        .collect();
    let mut not_ok = Vec::new();
    for task in tasks {
        not_ok.extend(task.await.unwrap());
    }
    not_ok
}

/// One Envoy labels at most this many upstream keys (contract section 6).
const FLOOD_LABELS: usize = 4 * FLOOD_MAX_UPSTREAMS;

/// More than `idle_timeout` (1 s): every breaker is idle after it.
const IDLE: Duration = Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_stays_bounded() {
    let _heavy = HEAVY.lock().await;
    let config = json!({
        "upstream_key": "header:x-tenant", "max_upstreams": FLOOD_MAX_UPSTREAMS,
        "idle_timeout": "1s", "failure_threshold": 5, "open_timeout": "30s", "health_path": "/health"
    });
    let bed = TestBed::start("key_flood", &config).await.unwrap();
    let addr = bed.envoy.listener();
    let pid = bed.envoy.pid();

    // A first batch fills the table and warms everything up (connections, pools, the VMs' heaps).
    // Then every breaker idles past idle_timeout, so the second batch's first keys evict them all
    // (and later ones evict whatever idled meanwhile).
    let first = 2_000;
    let started = Instant::now();
    let mut not_ok = flood(addr, 0..first).await;
    let (rss_first, heap_first) = (rss_kib(pid), heap_allocated(&bed.envoy).await);
    tokio::time::sleep(IDLE).await;
    not_ok.extend(flood(addr, first..FLOOD_KEYS).await);
    let elapsed = started.elapsed();
    let (rss_all, heap_all) = (rss_kib(pid), heap_allocated(&bed.envoy).await);
    // Past 4 x max_upstreams labelled keys when the flood was too quick to get there: waves of
    // max_upstreams new keys, each after the table idled, each evicting breakers (all of them, less
    // the races two new keys lose over one idle slot). 16 waves are four times what that takes.
    let mut keys = FLOOD_KEYS;
    for _ in 0..16 {
        let m = bed.envoy.metrics().await.unwrap();
        if m.sum("circuit_breaker_calls_total", &[("upstream", "_other")]) > 0.0 {
            break;
        }
        tokio::time::sleep(IDLE).await;
        not_ok.extend(flood(addr, keys..keys + FLOOD_MAX_UPSTREAMS).await);
        keys += FLOOD_MAX_UPSTREAMS;
    }
    assert!(
        not_ok.is_empty(),
        "{} requests were not answered 200, e.g. {:?}",
        not_ok.len(),
        &not_ok[..not_ok.len().min(5)]
    );

    // Bounded: max_upstreams breakers at a time. A key had a breaker when it found an empty slot (the
    // first 64) or evicted an idle one; every other key passed untracked and was counted.
    let (code, body) = health(&bed.envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let listed = body["circuit_breakers"].as_array().unwrap().len();
    assert_eq!(listed, FLOOD_MAX_UPSTREAMS, "{body}");
    let m = bed.envoy.metrics().await.unwrap();
    let untracked = global(&m, "circuit_breaker_untracked_calls_total") as usize;
    let recorded = m.sum("circuit_breaker_calls_total", &[]) as usize;
    let evicted = global(&m, "circuit_breaker_evicted_total") as usize;
    assert!(
        evicted >= FLOOD_MAX_UPSTREAMS,
        "the second batch evicts the first one's {FLOOD_MAX_UPSTREAMS} idle breakers: evicted \
         {evicted}"
    );
    assert_eq!(recorded, FLOOD_MAX_UPSTREAMS + evicted);
    assert_eq!(recorded + untracked, keys);
    assert_eq!(bed.web.requests() as usize, keys);
    // Metrics are labelled with 4 x max_upstreams keys at most, in every series with an upstream
    // label; calls of further keys are counted as _other, and the first such key is logged once.
    let labelled: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("circuit_breaker_"))
        .filter_map(|s| s.labels.get("upstream").map(String::as_str))
        .filter(|u| *u != "_other")
        .collect();
    assert_eq!(labelled.len(), FLOOD_LABELS, "{evicted} evicted");
    let other = m.sum("circuit_breaker_calls_total", &[("upstream", "_other")]) as usize;
    assert_eq!(other, recorded - FLOOD_LABELS);
    let told = bed
        .envoy
        .log()
        .lines()
        .filter(|l| l.contains("counted as upstream=_other"))
        .count();
    assert_eq!(told, 1, "the first key past the label limit is logged once");

    // Flat memory: 98,000 keys after the first batch. Had the filter kept anything per key (a string
    // and a map entry are ~100 bytes, twice for two workers), it would show as ~20 MB; what a busy
    // Envoy moves by itself, and the series of the at most 192 keys labelled after the first batch,
    // are well under the bound.
    let growth_kib = rss_all.saturating_sub(rss_first);
    println!(
        "key flood: {FLOOD_KEYS} keys in {elapsed:?} (with a {IDLE:?} pause) over \
         {FLOOD_CONNECTIONS} HTTP/1.1 connections ({FLOOD_BATCH} pipelined at a time); RSS \
         {rss_first} KiB after {first} keys, {rss_all} KiB after all (+{growth_kib} KiB); Envoy \
         heap {heap_first} -> {heap_all} bytes; evicted {evicted}, untracked {untracked}, _other \
         {other}"
    );
    assert!(
        growth_kib < 4 * 1024,
        "RSS grew by {growth_kib} KiB over {} new keys",
        FLOOD_KEYS - first
    );

    // Still a working breaker for a tracked key. And once the flood idled out, a new key gets a
    // breaker of its own (evicting an idle one) that opens too: junk keys cannot keep a real
    // upstream from its breaker.
    tokio::time::sleep(IDLE).await;
    bed.web.set_fault(Fault::Unavailable).await.unwrap();
    let tracked = body["circuit_breakers"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_string();
    let page = async |tenant: &str| {
        bed.envoy
            .get_with("/page", &[("x-tenant", tenant)])
            .await
            .unwrap()
    };
    for tenant in [tracked.as_str(), "after-the-flood"] {
        for _ in 0..5 {
            let r = page(tenant).await;
            assert_eq!(
                (r.status, r.header("x-circuit-breaker")),
                (503, None),
                "{r:?}"
            );
        }
        let r = page(tenant).await;
        assert_eq!(
            r.header("x-circuit-breaker"),
            Some("open"),
            "{tenant}: {r:?}"
        );
    }
    assert_eq!(
        global(
            &bed.envoy.metrics().await.unwrap(),
            "circuit_breaker_evicted_total"
        ) as usize,
        evicted + 1,
        "after-the-flood took an idle breaker's slot"
    );
    assert_no_trap(&bed.envoy);
}

/// How the raw upstream answers one case: the `grpc-status` and `grpc-message` bytes to send (`None`:
/// leave the field out), and what the breaker must make of it.
struct Case {
    name: &'static str,
    grpc_status: Option<&'static [u8]>,
    grpc_message: Option<Vec<u8>>,
    failure: bool,
}

fn malformed_cases() -> Vec<Case> {
    let case = |name, status: Option<&'static [u8]>, message: Option<Vec<u8>>, failure| Case {
        name,
        grpc_status: status,
        grpc_message: message,
        failure,
    };
    vec![
        case("ok", Some(b"0"), None, false),
        case("alpha", Some(b"abc"), None, true),
        case("too-long", Some(b"99999"), None, true),
        case("beyond-16", Some(b"999"), None, true),
        case("negative", Some(b"-1"), None, true),
        case("empty", Some(b""), None, true),
        case("spaces", Some(b" 0 "), None, true),
        case("non-ascii", Some(b"\xff\xfe0"), None, true),
        case("missing", None, None, true),
        case(
            "long-message-ok",
            Some(b"0"),
            Some(vec![b'm'; 10 * 1024]),
            false,
        ),
        case(
            "long-message-fail",
            Some(b"14"),
            Some(vec![b'm'; 10 * 1024]),
            true,
        ),
        case(
            "binary-message",
            Some(b"13"),
            Some((0x80..=0xffu8).cycle().take(4096).collect()),
            true,
        ),
        // Past Envoy's limit on an upstream response's headers (60 KiB): Envoy resets the upstream
        // stream, and that is a failure whatever the status claimed.
        case(
            "oversized-message",
            Some(b"0"),
            Some(vec![b'm'; 100 * 1024]),
            true,
        ),
    ]
}

/// Forms of a gRPC response: status in trailers after a message, or in the headers alone.
const FORMS: [&str; 2] = ["trailers", "trailers-only"];

/// A raw HTTP/2 upstream: answers each call as `x-case: <case>/<form>` says, with any bytes as
/// `grpc-status` and `grpc-message` (tonic's server would never send a malformed status).
async fn start_raw_upstream() -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    tokio::spawn(serve_raw_connection(socket));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (port, task)
}

async fn serve_raw_connection(socket: TcpStream) {
    let Ok(mut connection) = h2::server::handshake(socket).await else {
        return;
    };
    // Accepting drives the connection; each stream is answered on its own task.
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(answer_raw(request, respond));
    }
}

async fn answer_raw(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let case_header = request
        .headers()
        .get("x-case")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok/trailers")
        .to_string();
    // Read the request to its end (and give the flow-control window back).
    let mut body = request.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let (name, form) = case_header.split_once('/').unwrap_or(("ok", "trailers"));
    let cases = malformed_cases();
    let Some(case) = cases.iter().find(|c| c.name == name) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let mut fields = http::HeaderMap::new();
    if let Some(status) = case.grpc_status {
        fields.insert(
            "grpc-status",
            http::HeaderValue::from_bytes(status).unwrap(),
        );
    }
    if let Some(message) = &case.grpc_message {
        fields.insert(
            "grpc-message",
            http::HeaderValue::from_bytes(message).unwrap(),
        );
    }
    let mut response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if form == "trailers-only" {
        for (k, v) in &fields {
            response = response.header(k, v);
        }
        let _ = respond.send_response(response.body(()).unwrap(), true);
        return;
    }
    let Ok(mut stream) = respond.send_response(response.body(()).unwrap(), false) else {
        return;
    };
    // One empty message (an empty protobuf is a valid `Post`): flag 0, length 0.
    let _ = stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
    if fields.is_empty() {
        // A trailers frame must carry something: one field that is not a status.
        fields.insert("x-no-status", http::HeaderValue::from_static("1"));
    }
    let _ = stream.send_trailers(fields);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_status_and_message_are_failures() {
    let (port, _upstream) = start_raw_upstream().await;
    let ports = UpstreamPorts {
        user: 1,
        content: port,
        feed: 3,
        auth: 4,
        web: 5,
    };
    // One breaker per case (the key is the x-case header); nothing ever opens (thresholds out of reach),
    // so every call reaches the upstream and is recorded.
    let config =
        json!({"upstream_key": "header:x-case", "failure_threshold": 0, "minimum_requests": 100});
    let envoy = Envoy::start("malformed", &ports, &config.to_string())
        .await
        .unwrap();
    let channel = envoy.channel().await.unwrap();
    let message = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };
    let path = "/social.v1.ContentService/GetPost";
    for case in malformed_cases() {
        for form in FORMS {
            let key = format!("{}/{form}", case.name);
            let answer = raw_grpc(&channel, path, &[("x-case", &key)], &message).await;
            // What reaches the client is Envoy's business; only its arrival (no hang) matters here.
            let summary = match &answer {
                Ok(r) => format!(
                    "HTTP {} grpc-status {:?} ({} bytes of grpc-message)",
                    r.status,
                    r.grpc_status(),
                    r.trailers
                        .as_ref()
                        .and_then(|t| t.get("grpc-message"))
                        .or_else(|| r.headers.get("grpc-message"))
                        .map_or(0, |v| v.len())
                ),
                Err(e) => format!("error: {e}"),
            };
            println!("malformed: {key:<34} -> {summary}");
        }
    }
    // A well-formed call after all of them: the filter still serves (and counts).
    let after = raw_grpc(&channel, path, &[("x-case", "ok/after")], &message)
        .await
        .unwrap();
    assert_eq!(after.grpc_status(), Some("0"), "{after:?}");

    let mut m = envoy.metrics().await.unwrap();
    let expected_calls = (malformed_cases().len() * FORMS.len() + 1) as f64;
    for _ in 0..100 {
        if m.sum("circuit_breaker_calls_total", &[]) >= expected_calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = envoy.metrics().await.unwrap();
    }
    let mut wrong = Vec::new();
    for case in malformed_cases() {
        for form in FORMS {
            let key = format!("{}/{form}", case.name);
            let result = if case.failure { "failure" } else { "success" };
            let got = m.value(
                "circuit_breaker_calls_total",
                &[("upstream", key.as_str()), ("result", result)],
            );
            if got != Some(1.0) {
                wrong.push(format!("{key}: expected one {result}, got {got:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\n{}",
        m.dump("circuit_breaker_calls")
    );
    assert_eq!(m.sum("circuit_breaker_calls_total", &[]), expected_calls);
    assert_no_trap(&envoy);
}
