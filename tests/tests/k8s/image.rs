//! The OCI image: `k8s/image/oci-image.py` (`make image`) writes a valid, reproducible image layout
//! with the filter (or, `--native`, the module) at its root.

use super::*;

use std::io::Read;

use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the blob a descriptor names and checks its digest and size.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    let bytes = fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest} missing: {e}"));
    assert_eq!(
        sha256_hex(&bytes),
        hex,
        "blob {digest}: content does not match its digest"
    );
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "blob {digest}: size"
    );
    bytes
}

fn write_image(module_flag: &str, module: &Path, out: &Path) -> String {
    let output = Command::new(which("python3", "k8s/image/oci-image.py needs Python 3"))
        .arg(k8s("image/oci-image.py"))
        .arg(module_flag)
        .arg(module)
        .arg("--out")
        .arg(out)
        .args(["--tag", "0.1.0"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "oci-image.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An OCI image layout of one manifest, checked: its index descriptor, its config, and the files of
/// its single layer.
fn read_image(layout: &Path) -> (Value, Value, BTreeMap<String, Vec<u8>>) {
    let read_json = |name: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(layout.join(name)).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        read_json("oci-layout"),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read_json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    let descriptor = manifests[0].clone();
    assert_eq!(
        descriptor["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        descriptor["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );

    let manifest: Value = serde_json::from_slice(&blob(layout, &descriptor)).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], descriptor["mediaType"]);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(layout, &manifest["config"])).unwrap();
    // One layer, a gzip'd tar (Istio's compat variant for the wasm image).
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let compressed = blob(layout, &layers[0]);
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice())
        .read_to_end(&mut tar_bytes)
        .expect("the layer is gzip");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([format!("sha256:{}", sha256_hex(&tar_bytes))]),
        "the config's diff_id is the uncompressed layer's digest"
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        files.insert(path, content);
    }
    (descriptor, config, files)
}

#[test]
fn make_image_writes_a_valid_oci_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("circuit-breaker");
    let wasm_path = envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"));
    let printed = write_image("--wasm", &wasm_path, &layout);
    let (descriptor, _, files) = read_image(&layout);
    let wasm = fs::read(&wasm_path).unwrap();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["plugin.wasm"],
        "the layer holds plugin.wasm only"
    );
    assert!(
        files["plugin.wasm"] == wasm,
        "plugin.wasm is the built filter"
    );

    // The digest to put in the WasmPlugin is printed, and the same module gives the same image.
    let digest = descriptor["digest"].as_str().unwrap();
    assert!(
        printed.contains(&format!("sha256: {}", &digest["sha256:".len()..])),
        "{printed}"
    );
    let again = tmp.path().join("again");
    write_image("--wasm", &wasm_path, &again);
    assert_eq!(
        fs::read(again.join("index.json")).unwrap(),
        fs::read(layout.join("index.json")).unwrap(),
        "the image is reproducible"
    );
}

/// `make image-native`: the image the native forms mount as a volume holds the module at its root,
/// as `libcircuit_breaker.so`, for linux/amd64. The script packs the file's bytes as they are, so a
/// stand-in ELF file shows it without the built module.
#[test]
fn make_image_native_writes_an_image_with_the_module_at_its_root() {
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module.so");
    let bytes = b"\x7fELF a stand-in for libcircuit_breaker.so".to_vec();
    fs::write(&module, &bytes).unwrap();
    let layout = tmp.path().join("circuit-breaker-native");
    let printed = write_image("--native", &module, &layout);
    let (descriptor, config, files) = read_image(&layout);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["libcircuit_breaker.so"],
        "the layer holds the module only, at the root the volume is mounted from"
    );
    assert!(
        files["libcircuit_breaker.so"] == bytes,
        "the module, unchanged"
    );
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&json!("linux"), &json!("amd64"))
    );
    assert!(
        printed.contains(descriptor["digest"].as_str().unwrap()),
        "{printed}"
    );
    // Not a shared object: refused.
    let output = Command::new(which("python3", "k8s/image/oci-image.py needs Python 3"))
        .arg(k8s("image/oci-image.py"))
        .args(["--native"])
        .arg(envoy::wasm_path().unwrap_or_else(|e| panic!("{e}")))
        .arg("--out")
        .arg(tmp.path().join("refused"))
        .args(["--tag", "0.1.0"])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a wasm module packed as the native one"
    );
}
