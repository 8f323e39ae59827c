//! The built module's symbol table, read with `nm -D`, against what Envoy 1.40 needs: every hook it
//! resolves by name is exported (one missing and Envoy refuses the config with "Failed to resolve
//! symbol"), the module defines none of Envoy's callbacks itself (the test stubs stay out of it), and
//! every callback it imports is one the Envoy binary exports.
//!
//! Checks the `.so` cargo built next to this test, and `CB_NATIVE` (`make build`'s
//! `dist/libcircuit_breaker.so`) when set.
// A test file: its helpers fail the test loudly (clippy only exempts `#[test]` functions themselves).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The hooks Envoy 1.40 looks up when it loads an HTTP filter module; all are required.
const REQUIRED_HOOKS: [&str; 21] = [
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
];

const CALLBACK_PREFIX: &str = "envoy_dynamic_module_callback_";

/// `nm -D` of `path` with `flag` (`--defined-only` or `--undefined-only`): the symbol names.
fn symbols(path: &Path, flag: &str) -> Vec<String> {
    let out = Command::new("nm")
        .args(["-D", flag])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nm (binutils) on {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "nm {flag} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

/// The modules to check: the one built with this test, and `CB_NATIVE` when set.
fn modules() -> Vec<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/exports-<hash>: `cargo test` leaves the library it built for this test beside
    // it (and does not copy it up to target/<profile>/, where `cargo build` puts one).
    let deps = exe.parent().unwrap();
    let mut out = vec![deps.join("libcircuit_breaker.so")];
    if let Some(p) = std::env::var_os("CB_NATIVE").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CB_NATIVE={} is not a file: run `make build`",
            p.display()
        );
        out.push(p);
    }
    for m in &out {
        assert!(m.is_file(), "no module at {}", m.display());
    }
    out
}

/// The Envoy binary: `ENVOY`, else the one `make envoy` installs in `.tools/`.
fn envoy() -> PathBuf {
    let path = std::env::var_os("ENVOY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/envoy"));
    // `.tools/envoy` is a symlink into the virtualenv: nm wants the binary itself.
    path.canonicalize().unwrap_or_else(|e| {
        panic!(
            "no Envoy at {} ({e}): set ENVOY or run `make envoy`",
            path.display()
        )
    })
}

#[test]
fn every_hook_envoy_requires_is_exported() {
    for module in modules() {
        let defined = symbols(&module, "--defined-only");
        let missing: Vec<_> = REQUIRED_HOOKS
            .iter()
            .filter(|h| !defined.iter().any(|d| d == *h))
            .collect();
        assert!(
            missing.is_empty(),
            "{} lacks hooks Envoy requires: {missing:?}",
            module.display()
        );
    }
}

#[test]
fn the_module_defines_none_of_envoys_callbacks() {
    for module in modules() {
        let own: Vec<_> = symbols(&module, "--defined-only")
            .into_iter()
            .filter(|s| s.starts_with(CALLBACK_PREFIX))
            .collect();
        assert!(
            own.is_empty(),
            "{} defines Envoy callbacks itself (the stubs leaked in?): {own:?}",
            module.display()
        );
    }
}

#[test]
fn every_callback_the_module_imports_is_exported_by_envoy() {
    let envoy = envoy();
    let exported = symbols(&envoy, "--defined-only");
    for module in modules() {
        let imported: Vec<_> = symbols(&module, "--undefined-only")
            .into_iter()
            .filter(|s| s.starts_with(CALLBACK_PREFIX))
            .collect();
        assert!(
            !imported.is_empty(),
            "{} imports no Envoy callback at all",
            module.display()
        );
        let unknown: Vec<_> = imported.iter().filter(|s| !exported.contains(s)).collect();
        assert!(
            unknown.is_empty(),
            "{} imports callbacks {} does not export: {unknown:?}",
            module.display(),
            envoy.display()
        );
    }
}
