//! Every rendered object checked against the models the projects publish (k8s/validate/validate.py,
//! over cloudcoil's models of Istio's, the Prometheus Operator's and Kubernetes' own CRDs and
//! OpenAPI), and, where no package covers a kind, against the hand-written JSON Schemas of
//! `k8s/schemas/`. Each check is shown to fail on broken objects, so a pass means something.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use super::{
    k8s, kind, kustomize, named, only_of_kind, root, yaml_documents, Loader, Overlay, Side,
    OVERLAYS,
};

/// Which source validates each kind k8s/ renders (the table in k8s/README.md).
const SOURCES: [(&str, &str); 6] = [
    ("WasmPlugin", "cloudcoil-models-istio"),
    ("EnvoyFilter", "cloudcoil-models-istio"),
    ("PrometheusRule", "cloudcoil-models-prometheus-operator"),
    ("ConfigMap", "cloudcoil-models-kubernetes"),
    ("EnvoyProxy", "k8s/schemas/envoyproxy.schema.json"),
    (
        "EnvoyExtensionPolicy",
        "k8s/schemas/envoyextensionpolicy.schema.json",
    ),
];

/// The Python of the virtualenv `make k8s-tools` fills: `CB_K8S_PYTHON`, else `.venv/bin/python`.
fn python() -> PathBuf {
    let path = std::env::var_os("CB_K8S_PYTHON")
        .filter(|p| !p.is_empty())
        .map_or_else(|| root().join(".venv/bin/python"), PathBuf::from);
    assert!(
        path.is_file(),
        "no {}: `make k8s-tools` creates it with the published models k8s/validate/validate.py \
         checks against (or set CB_K8S_PYTHON to a Python that has them)",
        path.display()
    );
    path
}

/// Runs k8s/validate/validate.py with `args`, `input` on its stdin.
fn run_validator(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(python())
        .arg(k8s("validate/validate.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run k8s/validate/validate.py: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// validate.py's report on each of `docs`, in order.
fn model_reports(docs: &[Value]) -> Vec<Value> {
    let output = run_validator(&["--json"], &Value::from(docs.to_vec()).to_string());
    assert!(
        output.status.success(),
        "k8s/validate/validate.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reports: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("validate.py --json printed no JSON list: {e}"));
    assert_eq!(reports.len(), docs.len(), "one report per object");
    reports
}

/// The JSON Schemas of `k8s/schemas/`, by the apiVersion and kind each one pins.
struct Schemas {
    by_kind: BTreeMap<(String, String), (String, jsonschema::Validator)>,
}

impl Schemas {
    fn load() -> Self {
        let dir = k8s("schemas");
        let mut by_kind = BTreeMap::new();
        for entry in fs::read_dir(&dir).expect("k8s/schemas") {
            let path = entry.expect("k8s/schemas entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".schema.json") {
                continue;
            }
            let schema: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            let pinned = |field: &str| {
                schema
                    .pointer(&format!("/properties/{field}/const"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{name} does not pin {field} with a const"))
                    .to_string()
            };
            let key = (pinned("apiVersion"), pinned("kind"));
            let validator = jsonschema::validator_for(&schema)
                .unwrap_or_else(|e| panic!("{name} is not a valid JSON Schema: {e}"));
            assert!(
                by_kind
                    .insert(key.clone(), (format!("k8s/schemas/{name}"), validator))
                    .is_none(),
                "two schemas for {key:?}"
            );
        }
        Self { by_kind }
    }

    fn get(&self, doc: &Value) -> Option<&(String, jsonschema::Validator)> {
        let key = (
            doc["apiVersion"].as_str().unwrap_or("").to_string(),
            kind(doc).to_string(),
        );
        self.by_kind.get(&key)
    }
}

/// What validated one object, and what it found.
struct Verdict {
    sources: Vec<String>,
    errors: Vec<String>,
}

/// Both checks together: the published model where one covers the kind, the hand-written schema
/// where none does (and the model of the Kubernetes types embedded in it, where it has some).
struct Validation {
    schemas: Schemas,
}

impl Validation {
    fn new() -> Self {
        Self {
            schemas: Schemas::load(),
        }
    }

    fn verdicts(&self, docs: &[Value]) -> Vec<Verdict> {
        docs.iter()
            .zip(model_reports(docs))
            .map(|(doc, report)| self.verdict(doc, &report))
            .collect()
    }

    fn verdict(&self, doc: &Value, report: &Value) -> Verdict {
        let mut sources = Vec::new();
        let mut errors: Vec<String> = report["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| e.as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(model) = report["model"].as_str() {
            sources.push(model.to_string());
        }
        if report["covers"] != "object" {
            match self.schemas.get(doc) {
                Some((name, validator)) => {
                    sources.push(name.clone());
                    errors.extend(
                        validator
                            .iter_errors(doc)
                            .map(|e| format!("{name}: {e} at {}", e.instance_path())),
                    );
                }
                None => errors.push(format!(
                    "no published model and no schema in k8s/schemas for {}/{}",
                    doc["apiVersion"].as_str().unwrap_or(""),
                    kind(doc)
                )),
            }
        }
        errors.extend(name_errors(doc));
        Verdict { sources, errors }
    }
}

/// The API server refuses an object whose name or namespace is not a DNS name; the CRDs' schemas
/// (and so the models) do not say so.
fn name_errors(doc: &Value) -> Vec<String> {
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let mut errors = Vec::new();
    match doc["metadata"]["name"].as_str() {
        Some(name) if name.len() <= 253 && name.split('.').all(dns_label) => {}
        other => errors.push(format!("metadata.name {other:?} is not a DNS subdomain")),
    }
    if let Some(ns) = doc["metadata"]["namespace"].as_str() {
        if !dns_label(ns) {
            errors.push(format!("metadata.namespace {ns:?} is not a DNS label"));
        }
    }
    errors
}

/// Every kustomization under k8s/.
fn kustomizations() -> Vec<String> {
    let mut dirs: Vec<String> = ["base", "monitoring", "envoy-gateway"]
        .map(String::from)
        .to_vec();
    dirs.extend(OVERLAYS.iter().map(|o| o.path()));
    dirs
}

#[test]
fn every_kustomization_renders_and_validates() {
    let validation = Validation::new();
    let rendered: Vec<(String, Vec<Value>)> = kustomizations()
        .into_iter()
        .map(|dir| {
            let docs = kustomize(&dir);
            (dir, docs)
        })
        .collect();
    // One validator run for all of them: loading the models is most of its time.
    let all: Vec<Value> = rendered.iter().flat_map(|(_, docs)| docs.clone()).collect();
    let mut verdicts = validation.verdicts(&all).into_iter();
    for (dir, docs) in &rendered {
        let verdicts: Vec<Verdict> = verdicts.by_ref().take(docs.len()).collect();
        let errors: Vec<String> = docs
            .iter()
            .zip(&verdicts)
            .flat_map(|(doc, verdict)| {
                let what = format!(
                    "{}/{}",
                    kind(doc),
                    doc["metadata"]["name"].as_str().unwrap_or("?")
                );
                verdict.errors.iter().map(move |e| format!("{what}: {e}"))
            })
            .collect();
        assert!(
            errors.is_empty(),
            "k8s/{dir} renders objects that do not validate:\n{}",
            errors.join("\n")
        );
        // Each kind is validated by the source the README names.
        for (doc, verdict) in docs.iter().zip(&verdicts) {
            let (_, expected) = SOURCES
                .iter()
                .find(|(k, _)| *k == kind(doc))
                .unwrap_or_else(|| panic!("k8s/{dir} renders a {} SOURCES lacks", kind(doc)));
            assert!(
                verdict.sources.iter().any(|s| s.starts_with(expected)),
                "k8s/{dir}: {} validated by {:?}, not {expected}",
                kind(doc),
                verdict.sources
            );
        }

        // (kind, name) of every object rendered.
        let objects: BTreeSet<(&str, &str)> = docs
            .iter()
            .map(|d| (kind(d), d["metadata"]["name"].as_str().unwrap_or("")))
            .collect();
        let expected: BTreeSet<(&str, &str)> = match dir.as_str() {
            "base" => [("WasmPlugin", "circuit-breaker")].into(),
            "monitoring" => [
                ("PrometheusRule", "circuit-breaker"),
                ("ConfigMap", "circuit-breaker-dashboard"),
            ]
            .into(),
            "envoy-gateway" => [
                ("EnvoyProxy", "circuit-breaker"),
                ("EnvoyExtensionPolicy", "circuit-breaker"),
            ]
            .into(),
            _ => {
                let overlay = Overlay::find(dir.trim_start_matches("overlays/"));
                // One way to load it on each side, never two: two copies in one chain would be two
                // breakers per call.
                let loading_kind = match overlay.loader {
                    Loader::WasmPlugin => "WasmPlugin",
                    Loader::EnvoyFilter | Loader::Native => "EnvoyFilter",
                };
                let mut objects: BTreeSet<(&str, &str)> =
                    [(loading_kind, Side::Caller.object_name())].into();
                if overlay.destination {
                    objects.insert((loading_kind, Side::Destination.object_name()));
                }
                if overlay.env() != "dev" {
                    objects.extend([
                        ("PrometheusRule", "circuit-breaker"),
                        ("ConfigMap", "circuit-breaker-dashboard"),
                    ]);
                }
                objects
            }
        };
        assert_eq!(objects, expected, "objects rendered by k8s/{dir}");
        assert_eq!(
            docs.len(),
            expected.len(),
            "k8s/{dir} renders each object once (the overlays' config ConfigMap is local-config \
             and must not be applied)"
        );
    }
}

type Breakage = (&'static str, fn(&mut Value));

fn b(what: &'static str, f: fn(&mut Value)) -> Breakage {
    (what, f)
}

fn patch0(d: &mut Value) -> &mut Value {
    &mut d["spec"]["configPatches"][0]
}

fn remove(object: &mut Value, field: &str) {
    object
        .as_object_mut()
        .expect("an object")
        .remove(field)
        .unwrap_or_else(|| panic!("no {field} to remove"));
}

/// Broken variants of each kind, every one of which validation must refuse: (kustomization, the
/// object as `Kind` when it renders one of that kind or `Kind/name`, the breakage).
fn breakages() -> Vec<(&'static str, &'static str, Breakage)> {
    vec![
        (
            "overlays/prod",
            "WasmPlugin",
            b("failStrategy typo", |d| {
                d["spec"]["failStrategy"] = json!("FAIL_OPENED")
            }),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("unknown phase", |d| {
                d["spec"]["phase"] = json!("BEFORE_ROUTER")
            }),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("match mode", |d| {
                d["spec"]["match"][0]["mode"] = json!("OUTBOUND")
            }),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("misspelt field", |d| {
                let config = d["spec"]["pluginConfig"].take();
                remove(&mut d["spec"], "pluginConfig");
                d["spec"]["pluginconfig"] = config;
            }),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("no url", |d| remove(&mut d["spec"], "url")),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("sha256 not hex", |d| d["spec"]["sha256"] = json!("latest")),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("pluginConfig not a map", |d| {
                d["spec"]["pluginConfig"] = json!("{}")
            }),
        ),
        (
            "overlays/prod",
            "WasmPlugin",
            b("bad name", |d| {
                d["metadata"]["name"] = json!("Circuit_Breaker")
            }),
        ),
        (
            "overlays/prod-inbound",
            "WasmPlugin/circuit-breaker-inbound",
            b("match mode SERVER misspelt", |d| {
                d["spec"]["match"][0]["mode"] = json!("INBOUND")
            }),
        ),
        (
            "overlays/prod-inbound",
            "WasmPlugin/circuit-breaker-inbound",
            b("phase after the router", |d| {
                d["spec"]["phase"] = json!("ROUTER")
            }),
        ),
        (
            "overlays/prod-inbound-envoyfilter",
            "EnvoyFilter/circuit-breaker-inbound",
            b("inbound context typo", |d| {
                patch0(d)["match"]["context"] = json!("SIDECAR_INBND")
            }),
        ),
        (
            "overlays/prod-inbound-native",
            "EnvoyFilter/circuit-breaker-inbound",
            b("port number not a number", |d| {
                patch0(d)["match"]["listener"]["portNumber"] = json!("http")
            }),
        ),
        (
            "overlays/prod-envoyfilter",
            "EnvoyFilter",
            b("context typo", |d| {
                patch0(d)["match"]["context"] = json!("SIDECAR_OUTBOND")
            }),
        ),
        (
            "overlays/prod-envoyfilter",
            "EnvoyFilter",
            b("operation typo", |d| {
                patch0(d)["patch"]["operation"] = json!("INSERT_BEFOR")
            }),
        ),
        (
            "overlays/prod-envoyfilter",
            "EnvoyFilter",
            b("misspelt subFilter", |d| {
                let filter = &mut patch0(d)["match"]["listener"]["filterChain"]["filter"];
                let sub = filter["subFilter"].take();
                remove(filter, "subFilter");
                filter["subfilter"] = sub;
            }),
        ),
        (
            "overlays/prod-native",
            "EnvoyFilter",
            b("applyTo typo", |d| {
                patch0(d)["applyTo"] = json!("HTTP_FILTERS")
            }),
        ),
        (
            "overlays/prod-native",
            "EnvoyFilter",
            b("value not a map", |d| {
                patch0(d)["patch"]["value"] = json!("filter")
            }),
        ),
        (
            "overlays/prod",
            "PrometheusRule",
            b("for is not a duration", |d| {
                d["spec"]["groups"][0]["rules"][0]["for"] = json!("2 minutes")
            }),
        ),
        (
            "overlays/prod",
            "PrometheusRule",
            b("no expr", |d| {
                remove(&mut d["spec"]["groups"][0]["rules"][0], "expr")
            }),
        ),
        (
            "overlays/prod",
            "PrometheusRule",
            b("unknown rule field", |d| {
                d["spec"]["groups"][0]["rules"][0]["keepFiringFor"] = json!("1m")
            }),
        ),
        (
            "overlays/prod",
            "ConfigMap",
            b("data not strings", |d| d["data"]["n"] = json!(1)),
        ),
        (
            "overlays/prod",
            "ConfigMap",
            b("misspelt binaryData", |d| d["binarydata"] = json!({})),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("misspelt dynamicModules", |d| {
                let modules = d["spec"]["dynamicModules"].take();
                remove(&mut d["spec"], "dynamicModules");
                d["spec"]["dynamicmodules"] = modules;
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("source type typo", |d| {
                d["spec"]["dynamicModules"][0]["source"]["type"] = json!("File")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("Local without local", |d| {
                remove(&mut d["spec"]["dynamicModules"][0]["source"], "local")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("Remote without sha256", |d| {
                d["spec"]["dynamicModules"][0]["source"] = json!({"type": "Remote", "remote": {"url": "https://example.com/libcircuit_breaker.so"}});
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("module name with _", |d| {
                d["spec"]["dynamicModules"][0]["name"] = json!("circuit_breaker")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("JSONPatch without patches", |d| {
                remove(&mut d["spec"]["bootstrap"], "jsonPatches")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("filterOrder with neither", |d| {
                remove(&mut d["spec"]["filterOrder"][0], "after")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("volume mount misspelt (core type)", |d| {
                d["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]
                    ["volumeMounts"][0]["mountpath"] = json!("/x");
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyProxy",
            b("image volume pullPolicy not a string (core type)", |d| {
                d["spec"]["provider"]["kubernetes"]["envoyDeployment"]["pod"]["volumes"][0]
                    ["image"]["pullPolicy"] = json!(7);
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyExtensionPolicy",
            b("misspelt filterName", |d| {
                let module = &mut d["spec"]["dynamicModule"][0];
                let name = module["filterName"].take();
                remove(module, "filterName");
                module["filtername"] = name;
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyExtensionPolicy",
            b("target kind", |d| {
                d["spec"]["targetRefs"][0]["kind"] = json!("Service")
            }),
        ),
        (
            "envoy-gateway",
            "EnvoyExtensionPolicy",
            b("no target", |d| remove(&mut d["spec"], "targetRefs")),
        ),
    ]
}

#[test]
fn validation_rejects_broken_manifests() {
    let validation = Validation::new();
    let mut rendered: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    let mut cases = Vec::new();
    for (dir, wanted, (what, breakage)) in breakages() {
        let docs = rendered.entry(dir).or_insert_with(|| kustomize(dir));
        let mut doc = match wanted.split_once('/') {
            Some((wanted, name)) => named(docs, wanted, name),
            None => only_of_kind(docs, wanted),
        }
        .clone();
        breakage(&mut doc);
        cases.push((what, doc));
    }
    // One validator run for all of them: each case is one object.
    let docs: Vec<Value> = cases.iter().map(|(_, d)| d.clone()).collect();
    for ((what, doc), verdict) in cases.iter().zip(validation.verdicts(&docs)) {
        assert!(
            !verdict.errors.is_empty(),
            "validation accepts a broken {} ({what}); checked by {:?}",
            kind(doc),
            verdict.sources
        );
    }
}

/// A manifest with misspelt fields (k8s/validate/testdata/misspelt.yaml): pydantic would drop them
/// without a word; validate.py names each one and fails.
#[test]
fn a_misspelt_field_fails_validation() {
    let fixture = fs::read_to_string(k8s("validate/testdata/misspelt.yaml")).unwrap();
    let docs = yaml_documents(&fixture, "k8s/validate/testdata/misspelt.yaml");
    let expected: BTreeMap<&str, Vec<&str>> = [
        ("WasmPlugin", vec!["spec.failstrategy"]),
        ("EnvoyFilter", vec!["spec.configPatches[0].patch.operaton"]),
        ("PrometheusRule", vec!["spec.groups[0].rules[0].annotation"]),
        ("ConfigMap", vec!["metadata.lables"]),
    ]
    .into();
    // Without the typos the same objects are valid: the fields above are their only faults. One
    // validator run for both sets.
    let fixed = fixture
        .replace("failstrategy", "failStrategy")
        .replace("operaton", "operation")
        .replace("annotation:", "annotations:")
        .replace("lables", "labels");
    let mut both = docs.clone();
    both.extend(yaml_documents(&fixed, "the fixture, corrected"));
    let reports = model_reports(&both);
    let (broken, corrected) = reports.split_at(docs.len());
    assert_eq!(broken.len(), expected.len(), "one object per kind");
    for report in broken {
        let kind = report["kind"].as_str().unwrap_or("");
        let errors: Vec<&str> = report["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let wanted: Vec<String> = expected[kind]
            .iter()
            .map(|path| {
                format!("{path}: unknown field (the model has no such field and dropped it)")
            })
            .collect();
        assert_eq!(errors, wanted, "{kind}: what validate.py reports");
    }
    for report in corrected {
        assert_eq!(report["errors"], json!([]), "{} corrected", report["kind"]);
    }

    // The command line a user runs says the same and fails.
    let output = run_validator(&[], &fixture);
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    for path in expected.values().flatten() {
        assert!(printed.contains(path), "{path} not named:\n{printed}");
    }
}

#[test]
fn the_hand_written_schemas_are_only_for_kinds_no_package_covers() {
    let schemas = Schemas::load();
    let kinds: BTreeSet<String> = schemas.by_kind.keys().map(|(_, k)| k.clone()).collect();
    let expected: BTreeSet<String> = SOURCES
        .iter()
        .filter(|(_, source)| source.starts_with("k8s/schemas/"))
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(kinds, expected, "k8s/schemas holds schemas for");
    let readme = fs::read_to_string(k8s("README.md")).unwrap();
    for (kind, source) in SOURCES {
        assert!(
            readme
                .lines()
                .any(|l| l.contains(&format!("`{kind}`")) && l.contains(source)),
            "k8s/README.md does not say that {source} validates {kind}"
        );
    }
}
