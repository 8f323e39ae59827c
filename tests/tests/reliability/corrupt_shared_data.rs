//! Corrupt shared data (section 4 of RELIABILITY.md): a second wasm module on the breaker's `vm_id`
//! (`tests/fixtures/corruptor`) writes foreign bytes under the breaker's keys; the next call fails
//! open, and the breaker restarts closed.

use super::*;

/// The shared-data key of `upstream`'s slot in the default table (`max_upstreams` 1024): its home slot,
/// where the first upstream of a fresh table always lands.
fn slot_key(upstream: &str) -> String {
    let table = cb_core::store::SharedData::new(cb_core::store::MemoryStore::new(), 1024);
    table.slot_key(cb_core::registry::home_slot(upstream, 1024))
}

/// How many bytes `upstream`'s slot takes with a count window of 100, as the corruptor reports it.
fn slot_len(upstream: &str) -> String {
    let slot = cb_core::store::Slot {
        key: upstream.to_string(),
        last_call_ms: 0,
        shaped_ms: 0,
        breaker: cb_core::breaker::Breaker::new(&cb_core::config::BreakerConfig::default()),
    };
    cb_core::codec::encode_slot(Some(&slot)).len().to_string()
}

/// A slot of `upstream` whose breaker part is `breaker_hex`, as hex.
fn slot_hex(upstream: &str, breaker_hex: &str) -> String {
    let mut hex = format!("cb5302{:04x}", (upstream.len() as u16).swap_bytes());
    for b in upstream.bytes() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.push_str(&"00".repeat(16));
    hex.push_str(breaker_hex);
    hex
}

/// Overwrites shared-data `key` through the corruptor with `hex` bytes (`repeat` times); returns the
/// length of what was there before (`none` if nothing).
async fn corrupt(envoy: &Envoy, key: &str, hex: &str, repeat: usize) -> String {
    let repeat = repeat.to_string();
    let r = envoy
        .get_with(
            "/corrupt",
            &[
                ("x-corrupt-key", key),
                ("x-corrupt-hex", hex),
                ("x-corrupt-repeat", &repeat),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-corrupt-written").is_some(), "{r:?}");
    r.header("x-corrupt-previous-len").unwrap().to_string()
}

/// The corruptor writes into shared data, which only the wasm build keeps its breakers in: for the
/// native build (breakers in the module's own memory, out of any other module's reach) the test says
/// so in one line and passes.
fn skipped_natively() -> bool {
    let native = Build::from_env() == Build::Native;
    if native {
        println!("not for the native build: its breakers live in process memory, not in shared data a second module could write");
    }
    native
}

async fn corrupted(envoy: &Envoy) -> f64 {
    global(
        &envoy.metrics().await.unwrap(),
        "circuit_breaker_corrupt_state_total",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_shared_data_fails_open_and_restarts() {
    if skipped_natively() {
        return;
    }
    let config = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let bed = LdsBed::start("corrupt", "envoy/lds-listener-corruptor.yaml", &config).await;
    let envoy = &bed.envoy;
    let channel = envoy.channel().await.unwrap();
    let state_key = slot_key("content");

    // content's breaker opens.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    assert_eq!(bed.content.requests(), 3);

    // Foreign bytes under its key. The corruptor, another module with the same vm_id, found the
    // breaker's own slot there: Envoy's shared data is per vm_id, not per module.
    let previous = corrupt(envoy, &state_key, "deadbeef", 1).await;
    assert_eq!(
        previous,
        slot_len("content"),
        "the corruptor does not see the breaker's data"
    );
    // The health endpoint cannot tell that breaker's state, so it claims nothing: 503, unknown.
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    assert!(health_entry(&body, "content").is_none(), "{body}");

    // The next call fails open (it reaches the upstream although the breaker was open), the breaker
    // restarts closed, and it is logged and counted.
    bed.content.set_fault(Fault::Ok).await.unwrap();
    get_post(&channel, &[]).await.unwrap();
    assert_eq!(bed.content.requests(), 4);
    assert_eq!(corrupted(envoy).await, 1.0);
    let log = envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains("corrupt state for upstream=content"))
        .unwrap_or_else(|| panic!("no warning; log: {}", envoy.log_path().display()));
    assert!(
        line.contains("[warning]") && line.contains("bad length or magic"),
        "{line}"
    );
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let content = health_entry(&body, "content").unwrap();
    assert_eq!(content["state"], "closed", "{body}");
    assert_eq!(content["consecutive_failures"], 0, "{body}");
    assert_eq!(content["calls_in_window"], 1, "{body}");

    // The restarted breaker works: it opens again on failures.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    bed.content.set_fault(Fault::Ok).await.unwrap();

    // Other foreign bytes: each fails open once, is counted, and names what was wrong.
    let cases = [
        ("truncated", "cb53".to_string(), 1, "bad length or magic"),
        (
            "other version",
            format!("cb5303{}", "00".repeat(90)),
            1,
            "unknown version 3",
        ),
        (
            "impossible state",
            slot_hex("content", &format!("cb0209{}", "00".repeat(61))),
            1,
            "impossible breaker state",
        ),
        ("one MiB", "cb".to_string(), 1 << 20, "bad length or magic"),
    ];
    // (Zero bytes are the subject of `empty_bytes_under_a_breaker_key_are_corrupt_state`.)
    for (n, (name, hex, repeat, why)) in cases.iter().enumerate() {
        corrupt(envoy, &state_key, hex, *repeat).await;
        let before = bed.content.requests();
        get_post(&channel, &[])
            .await
            .unwrap_or_else(|s| panic!("{name}: the call did not pass: {s:?}"));
        assert_eq!(bed.content.requests(), before + 1, "{name}");
        assert_eq!(corrupted(envoy).await, 2.0 + n as f64, "{name}");
        let log = envoy.log();
        assert!(
            log.lines()
                .filter(|l| l.contains("corrupt state for upstream=content"))
                .any(|l| l.contains(why)),
            "{name}: no warning naming {why:?}"
        );
    }

    // A corrupt slot that no upstream holds: health cannot vouch for it and says unknown, while the
    // breakers stay enforced through their own slots, and a new upstream gets a breaker.
    let other = {
        let table = cb_core::store::SharedData::new(cb_core::store::MemoryStore::new(), 1024);
        let home = cb_core::registry::home_slot("content", 1024);
        table.slot_key((home + 512) % 1024)
    };
    let previous = corrupt(envoy, &other, "0badc0de", 1).await;
    assert_ne!(
        previous, "none",
        "the table is created when a worker is configured"
    );
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("1 breaker states"),
        "{body}"
    );
    get_user(&channel).await.unwrap();
    let (_, body) = health(envoy, "/health").await;
    assert!(health_entry(&body, "user").is_some(), "{body}");
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");

    let m = envoy.metrics().await.unwrap();
    assert_eq!(global(&m, "circuit_breaker_cas_give_ups_total"), 0.0);
    println!(
        "corruption: {} corrupt states detected and restarted; {}",
        global(&m, "circuit_breaker_corrupt_state_total"),
        m.dump("circuit_breaker_corrupt")
    );
    assert_no_trap(envoy);
}

/// Zero bytes under a breaker's key are foreign bytes like any other: the call fails open, the state
/// is restarted at once, logged and counted as corrupt, and nothing is counted as a CAS give-up.
///
/// Envoy hands a zero-length value back with a CAS token but a null data pointer, and the SDK's
/// `get_shared_data` turns that into `None`, the answer for a key that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_bytes_under_a_breaker_key_are_corrupt_state() {
    if skipped_natively() {
        return;
    }
    let config = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let bed = LdsBed::start(
        "corrupt_empty",
        "envoy/lds-listener-corruptor.yaml",
        &config,
    )
    .await;
    let envoy = &bed.envoy;
    let channel = envoy.channel().await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");

    assert_eq!(
        corrupt(envoy, &slot_key("content"), "", 1).await,
        slot_len("content")
    );
    bed.content.set_fault(Fault::Ok).await.unwrap();
    get_post(&channel, &[]).await.unwrap();
    assert_eq!(bed.content.requests(), 4, "did not fail open");
    let m = envoy.metrics().await.unwrap();
    let summary = format!(
        "corrupt_state {}, untracked {}, cas_give_ups {}; log: {}",
        global(&m, "circuit_breaker_corrupt_state_total"),
        global(&m, "circuit_breaker_untracked_calls_total"),
        global(&m, "circuit_breaker_cas_give_ups_total"),
        envoy.log_path().display()
    );
    assert_eq!(
        global(&m, "circuit_breaker_corrupt_state_total"),
        1.0,
        "{summary}"
    );
    assert_eq!(
        global(&m, "circuit_breaker_cas_give_ups_total"),
        0.0,
        "{summary}"
    );
    // Restarted at once: the breaker is there again, closed, with the call just made.
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let content = health_entry(&body, "content").unwrap_or_else(|| panic!("{body}"));
    assert_eq!(content["calls_in_window"], 1, "{body}");
    assert!(envoy.log().contains("corrupt state for upstream=content"));
    assert_no_trap(envoy);
}
