//! Bootstrap templates from `envoy/`, rendered with the ports, the filter and its configuration.

use std::fs;
use std::path::Path;

use super::{err, workspace_root, Error, Result};

/// Upstream ports the template routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamPorts {
    /// `social.v1.UserService` → cluster `user`.
    pub user: u16,
    /// `social.v1.ContentService` → cluster `content`.
    pub content: u16,
    /// `social.v1.FeedService` → cluster `feed`.
    pub feed: u16,
    /// `social.v1.AuthService` → cluster `auth`.
    pub auth: u16,
    /// Everything else → cluster `web` (plain HTTP/1.1).
    pub web: u16,
}

impl UpstreamPorts {
    /// Ports for an Envoy that never routes a call (a configuration it must refuse): valid in the
    /// bootstrap, and nothing listens on them.
    pub const NEVER_ROUTED: Self = Self {
        user: 1,
        content: 2,
        feed: 3,
        auth: 4,
        web: 5,
    };
}

/// Renders a bootstrap template (a path relative to the workspace root, e.g. `envoy/e2e.yaml`). Ports 0
/// for admin and listener let Envoy pick them.
pub fn render_config(
    template: &str,
    ports: &UpstreamPorts,
    wasm: &Path,
    filter_config: &str,
) -> Result<String> {
    render_config_with(template, ports, wasm, filter_config, &[])
}

/// Like [`render_config`], also replacing each `{{NAME}}` of `vars` (given as `("NAME", value)`, the
/// value inserted verbatim) for templates with placeholders of their own, e.g. `envoy/lds.yaml`.
pub fn render_config_with(
    template: &str,
    ports: &UpstreamPorts,
    wasm: &Path,
    filter_config: &str,
    vars: &[(&str, &str)],
) -> Result<String> {
    let template_path = workspace_root().join(template);
    let template = fs::read_to_string(&template_path)
        .map_err(|e| Error(format!("cannot read {}: {e}", template_path.display())))?;
    // A JSON string is a valid YAML double-quoted scalar, so the filter's JSON goes in verbatim.
    let filter_config = serde_json::Value::String(filter_config.to_string()).to_string();
    let wasm = wasm
        .to_str()
        .ok_or_else(|| Error(format!("wasm path {} is not UTF-8", wasm.display())))?;
    let template = vars.iter().fold(template, |t, (name, value)| {
        t.replace(&format!("{{{{{name}}}}}"), value)
    });
    let rendered = template
        .replace("{{ADMIN_PORT}}", "0")
        .replace("{{LISTENER_PORT}}", "0")
        .replace("{{USER_PORT}}", &ports.user.to_string())
        .replace("{{CONTENT_PORT}}", &ports.content.to_string())
        .replace("{{FEED_PORT}}", &ports.feed.to_string())
        .replace("{{AUTH_PORT}}", &ports.auth.to_string())
        .replace("{{WEB_PORT}}", &ports.web.to_string())
        .replace("{{WASM_PATH}}", wasm)
        .replace("{{FILTER_CONFIG}}", &filter_config);
    if let Some(at) = rendered.find("{{") {
        let rest: String = rendered
            .get(at..)
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect();
        return err(format!(
            "{} has a placeholder the runner does not fill: {rest}",
            template_path.display()
        ));
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder() {
        let ports = UpstreamPorts {
            user: 1,
            content: 2,
            feed: 3,
            auth: 4,
            web: 5,
        };
        let yaml = render_config(
            "envoy/e2e.yaml",
            &ports,
            Path::new("/x/cb.wasm"),
            r#"{"a":"b\"c"}"#,
        )
        .unwrap();
        assert!(yaml.contains(r#"value: "{\"a\":\"b\\\"c\"}""#), "{yaml}");
        assert!(yaml.contains("port_value: 5"));
    }
}
