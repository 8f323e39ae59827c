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
