//! What one breaker guards: the upstream key computed for each request.

/// The `upstream_key` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKey {
    /// The route's Envoy cluster (`xds.cluster_name`).
    Cluster,
    /// The request's `:authority`.
    Authority,
    /// `pkg.Service` from a gRPC `:path`.
    GrpcService,
    /// `pkg.Service/Method` from a gRPC `:path`.
    GrpcMethod,
    /// The value of a request header (name stored lower-case).
    Header(String),
}

impl UpstreamKey {
    /// Parses the configuration spelling; `None` when it is not one of the allowed forms.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cluster" => Some(Self::Cluster),
            "authority" => Some(Self::Authority),
            "grpc_service" => Some(Self::GrpcService),
            "grpc_method" => Some(Self::GrpcMethod),
            _ => {
                let name = s.strip_prefix("header:")?.to_ascii_lowercase();
                let token = |b: u8| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b);
                (!name.is_empty() && name.bytes().all(token)).then_some(Self::Header(name))
            }
        }
    }

    /// The key for a gRPC `:path` (`/pkg.Service/Method`), for the two gRPC key kinds. `None` when the
    /// path is not of gRPC shape (the call then goes untracked) or the kind is not a gRPC one.
    pub fn from_grpc_path<'a>(&self, path: &'a str) -> Option<&'a str> {
        let path = path.split('?').next().unwrap_or(path);
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        match self {
            Self::GrpcService => Some(service),
            Self::GrpcMethod => Some(rest),
            _ => None,
        }
    }
}

/// An `:authority` as one breaker's key (contract section 2): lower-cased, without a trailing dot on
/// the host, and without the port when it is the default of the request's `:scheme` (80 for `http`,
/// 443 for `https`), so that `API.Example.com.:80` over http is `api.example.com`, and a client cannot
/// step around an open breaker by spelling the same host another way. `None` when no host is left.
pub fn normalize_authority(authority: &str, scheme: Option<&[u8]>) -> Option<String> {
    let lower = authority.trim().to_ascii_lowercase();
    // The port is what follows the last ':' — unless that ':' is inside an IPv6 literal's brackets.
    let (host, port) = match lower.rfind(':') {
        Some(i) if !lower.get(i..).is_some_and(|rest| rest.contains(']')) => {
            (lower.get(..i)?, lower.get(i + 1..))
        }
        _ => (lower.as_str(), None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let default_port = match scheme {
        Some(s) if s.eq_ignore_ascii_case(b"https") => "443",
        _ => "80",
    };
    Some(match port {
        None | Some("") => host.to_string(),
        Some(p) if p == default_port => host.to_string(),
        Some(p) => format!("{host}:{p}"),
    })
}

impl std::fmt::Display for UpstreamKey {
    /// The configuration spelling: `cluster`, `header:x-tenant`...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster => f.write_str("cluster"),
            Self::Authority => f.write_str("authority"),
            Self::GrpcService => f.write_str("grpc_service"),
            Self::GrpcMethod => f.write_str("grpc_method"),
            Self::Header(name) => write!(f, "header:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn authorities_that_name_one_host_are_one_key() {
        let http = Some(&b"http"[..]);
        let https = Some(&b"https"[..]);
        for a in [
            "example.com",
            "EXAMPLE.com",
            "example.com:80",
            "example.com.",
            "Example.COM.:80",
        ] {
            assert_eq!(
                normalize_authority(a, http).as_deref(),
                Some("example.com"),
                "{a}"
            );
        }
        assert_eq!(
            normalize_authority("API.Example.com.:80", http).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            normalize_authority("a.b:443", https).as_deref(),
            Some("a.b")
        );
        assert_eq!(
            normalize_authority("a.b:443", http).as_deref(),
            Some("a.b:443")
        );
        assert_eq!(
            normalize_authority("a.b:80", https).as_deref(),
            Some("a.b:80")
        );
        assert_eq!(
            normalize_authority("a.b:8080", http).as_deref(),
            Some("a.b:8080")
        );
        assert_eq!(
            normalize_authority("a.b:80", None).as_deref(),
            Some("a.b"),
            "no scheme: http"
        );
        assert_eq!(
            normalize_authority("[::1]:80", http).as_deref(),
            Some("[::1]")
        );
        assert_eq!(normalize_authority("[::1]", http).as_deref(), Some("[::1]"));
        assert_eq!(
            normalize_authority("[::1]:9000", http).as_deref(),
            Some("[::1]:9000")
        );
        assert_eq!(normalize_authority("a.b:", http).as_deref(), Some("a.b"));
        for empty in ["", ":80", ".", ".:80"] {
            assert_eq!(normalize_authority(empty, http), None, "{empty:?}");
        }
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(UpstreamKey::parse("cluster"), Some(UpstreamKey::Cluster));
        assert_eq!(
            UpstreamKey::parse("authority"),
            Some(UpstreamKey::Authority)
        );
        assert_eq!(
            UpstreamKey::parse("grpc_service"),
            Some(UpstreamKey::GrpcService)
        );
        assert_eq!(
            UpstreamKey::parse("grpc_method"),
            Some(UpstreamKey::GrpcMethod)
        );
        assert_eq!(
            UpstreamKey::parse("header:X-Tenant"),
            Some(UpstreamKey::Header("x-tenant".into()))
        );
        assert_eq!(UpstreamKey::parse("header:"), None);
        assert_eq!(UpstreamKey::parse("header:a b"), None);
        assert_eq!(UpstreamKey::parse("Cluster"), None);
        for spelling in [
            "cluster",
            "authority",
            "grpc_service",
            "grpc_method",
            "header:x-tenant",
        ] {
            assert_eq!(
                UpstreamKey::parse(spelling)
                    .map(|k| k.to_string())
                    .as_deref(),
                Some(spelling)
            );
        }
    }

    #[test]
    fn grpc_path_keys() {
        let p = "/social.content.v1.ContentService/GetPost";
        assert_eq!(
            UpstreamKey::GrpcService.from_grpc_path(p),
            Some("social.content.v1.ContentService")
        );
        assert_eq!(
            UpstreamKey::GrpcMethod.from_grpc_path(p),
            Some("social.content.v1.ContentService/GetPost")
        );
        assert_eq!(UpstreamKey::GrpcService.from_grpc_path("/"), None);
        assert_eq!(UpstreamKey::GrpcService.from_grpc_path("/a/b/c"), None);
        assert_eq!(UpstreamKey::GrpcService.from_grpc_path("nopath"), None);
        assert_eq!(UpstreamKey::Cluster.from_grpc_path(p), None);
    }
}
