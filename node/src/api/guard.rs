//! The protections in front of every route of the API, applied to the whole router in
//! [`super::serve`] (so a route added later is covered without doing anything):
//!
//! 1. `Host` must name this node: `localhost`, `127.0.0.1`, `[::1]`, the bound address, or a
//!    name given with `--api-host` (any port). Anything else is `421 Misdirected Request`.
//!    This defeats DNS rebinding: a web page whose name re-resolves to 127.0.0.1 still sends
//!    its own name as `Host`. An IP literal cannot be rebound, so when the API is bound to an
//!    unspecified address (`0.0.0.0`, `[::]`) any IP literal is accepted as well.
//! 2. A request other than `GET`/`HEAD`/`OPTIONS` that carries an `Origin` must come from one
//!    of those hosts, else `403`: a browser page elsewhere cannot drive the node.
//! 3. With an API key, every route needs `Authorization: Bearer <key>` (compared in constant
//!    time), else `401`; all but `GET` [`WHOAMI_PATH`], where the node proves who it is to the
//!    local commands before they send the key, and the console's assets, which hold no data
//!    ([`super::console::PUBLIC_ASSETS`]; the `Host` check and the bounds still apply).
//! 4. At most [`MAX_CONCURRENT_REQUESTS`] requests are served at once (a streamed answer holds
//!    its place until its body ends); more are shed at once with `503` and `Retry-After`.
//! 5. Request bodies are at most [`MAX_REQUEST_BODY`] bytes, else `413`.
//!
//! Every refusal has a JSON body in OpenAI's error shape, whose message says what to change.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::openai::error::OpenAiError;

/// Requests the API serves at once, over all routes and clients. A streamed answer (an
/// `/v1/mesh/infer` call, a streamed chat completion) counts until its last byte is sent.
/// Beyond this, requests are refused with `503` instead of queueing without bound.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;

pub use super::state::MAX_REQUEST_BODY;

/// The host names every API answers to, whatever its configuration.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// Who may use the API: its key and the extra names it answers to.
#[derive(Debug, Clone, Default)]
pub struct ApiAccess {
    /// A key every route requires as `Authorization: Bearer <key>`.
    pub key: Option<String>,
    /// Extra `Host` names (`--api-host`), with or without a port.
    pub hosts: Vec<String>,
}

/// The checks, built once per API.
pub(crate) struct Guard {
    /// Accepted host names, lower case, without port; IPv6 in brackets.
    hosts: HashSet<String>,
    /// Accept any IP literal (the API is bound to an unspecified address).
    any_ip: bool,
    key: Option<Arc<str>>,
    permits: Arc<Semaphore>,
}

impl Guard {
    pub(crate) fn new(bound: SocketAddr, access: &ApiAccess) -> Guard {
        let mut hosts: HashSet<String> = LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect();
        let ip = bound.ip();
        if !ip.is_unspecified() {
            hosts.insert(ip_name(ip));
        }
        hosts.extend(access.hosts.iter().filter_map(|h| host_name(h)));
        Guard {
            hosts,
            any_ip: ip.is_unspecified(),
            key: access.key.as_deref().map(Arc::from),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
        }
    }

    /// Whether a `Host` value (name and optional port) names this node.
    fn allows_host(&self, value: &str) -> bool {
        let Some(name) = host_name(value) else {
            return false;
        };
        self.hosts.contains(&name)
            || (self.any_ip && name.trim_matches(['[', ']']).parse::<IpAddr>().is_ok())
    }

    /// Whether an `Origin` value (`scheme://host[:port]`) is one of this node's hosts.
    fn allows_origin(&self, origin: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false; // includes the opaque origin "null"
        };
        matches!(scheme, "http" | "https") && !rest.contains('/') && self.allows_host(rest)
    }

    fn names(&self) -> String {
        let mut names: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        names.sort();
        names.join(", ")
    }

    /// The checks that need only the request's head.
    fn check(&self, request: &Request) -> Result<(), Box<OpenAiError>> {
        let headers = request.headers();
        let host = headers
            .get(header::HOST)
            .map(|v| v.to_str().unwrap_or("<not text>"))
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        match host {
            Some(host) if self.allows_host(host) => {}
            Some(host) => {
                return Err(OpenAiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "invalid_request_error",
                    "host_not_allowed",
                    format!(
                        "this node's API does not answer to Host {host:?} (it answers to {}); \
                         to reach it under another name, start the node with --api-host NAME",
                        self.names()
                    ),
                )
                .into())
            }
            None => {
                return Err(OpenAiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "invalid_request_error",
                    "host_not_allowed",
                    "the request has no Host header",
                )
                .into())
            }
        }
        let reads = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        );
        if let (false, Some(origin)) = (reads, headers.get(header::ORIGIN)) {
            let origin = origin.to_str().unwrap_or("<not text>");
            if !self.allows_origin(origin) {
                return Err(OpenAiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "origin_not_allowed",
                    format!(
                        "requests from web pages at {origin:?} are refused: only pages on this \
                         node's own hosts ({}) may send them",
                        self.names()
                    ),
                )
                .into());
            }
        }
        // The one route that needs no key: the node proving who it is, so that a local command
        // checks that before it sends the key (api::proof).
        let path = request.uri().path();
        let proof_only = request.method() == Method::GET && path == WHOAMI_PATH;
        // The console's assets hold no data; the page asks for the key when the API wants it.
        let asset = matches!(*request.method(), Method::GET | Method::HEAD)
            && super::console::PUBLIC_ASSETS.contains(&path);
        if let (Some(key), false) = (&self.key, proof_only || asset) {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                return Err(OpenAiError::invalid_api_key().into());
            }
        }
        let too_long = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len > MAX_REQUEST_BODY as u64);
        if too_long {
            return Err(OpenAiError::payload_too_large().into());
        }
        Ok(())
    }
}

/// The route that answers without the API key: the node's peer id and its signature of the
/// caller's challenge, nothing else ([`super::proof`]).
pub const WHOAMI_PATH: &str = "/v1/mesh/whoami";

/// Applies the checks to every route of `router`.
pub(crate) fn apply(router: Router, guard: Arc<Guard>) -> Router {
    router
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(axum::middleware::from_fn_with_state(guard, protect))
}

/// A refusal in the error shape of the API the request was for: Ollama's `{"error": "…"}` on
/// its routes (`/` and `/api/…`), OpenAI's everywhere else.
fn refusal(path: &str, error: &OpenAiError) -> Response {
    let mut response = if path == "/" || path.starts_with("/api/") {
        (
            error.status(),
            axum::Json(serde_json::json!({ "error": error.message() })),
        )
            .into_response()
    } else {
        (error.status(), axum::Json(error.body())).into_response()
    };
    if error.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn protect(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    if let Err(refused) = guard.check(&request) {
        return refusal(request.uri().path(), &refused);
    }
    let Ok(permit) = guard.permits.clone().try_acquire_owned() else {
        let busy = OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "api_busy",
            format!(
                "this node's API is serving its maximum of {MAX_CONCURRENT_REQUESTS} requests \
                 at once; try again shortly"
            ),
        );
        let mut response = refusal(request.uri().path(), &busy);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await.map(|body| {
        Body::new(Held {
            body,
            _permit: permit,
        })
    })
}

/// A response body that holds its request's place until it ends or is dropped.
struct Held {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The host name in a `Host` value (or an `Origin`'s authority): lower case, without the
/// port or a trailing dot, IPv6 in brackets. `None` if it is not a well-formed host.
pub(crate) fn host_name(value: &str) -> Option<String> {
    let value = value.trim().to_ascii_lowercase();
    let (name, port) = if value.starts_with('[') {
        let end = value.find(']')?;
        let (name, rest) = value.split_at(end + 1);
        (
            name.to_string(),
            rest.strip_prefix(':')
                .or(Some(rest).filter(|r| r.is_empty()))?,
        )
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) => (name.to_string(), port),
            None => (value.clone(), ""),
        }
    };
    if !port.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let name = name.strip_suffix('.').unwrap_or(&name).to_string();
    let valid = if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    };
    valid.then_some(name)
}

/// An address as it appears in a `Host` header.
fn ip_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str, hosts: &[&str], key: Option<&str>) -> Guard {
        Guard::new(
            bound.parse().unwrap(),
            &ApiAccess {
                key: key.map(String::from),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
            },
        )
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(method).uri("/v1/mesh/status");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn status_of(g: &Guard, method: &str, headers: &[(&str, &str)]) -> u16 {
        match g.check(&request(method, headers)) {
            Ok(()) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn host_names_are_normalised_and_malformed_ones_refused() {
        assert_eq!(host_name("LocalHost:7440").as_deref(), Some("localhost"));
        assert_eq!(host_name("localhost.").as_deref(), Some("localhost"));
        assert_eq!(host_name("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_name("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host_name("127.0.0.1").as_deref(), Some("127.0.0.1"));
        for bad in [
            "",
            "::1",
            "[::1]x",
            "[zz]",
            "a b",
            "evil.example:http",
            "x/y",
        ] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_this_nodes_hosts_are_served() {
        let g = guard("127.0.0.1:7440", &["mybox.lan:7440"], None);
        for host in [
            "localhost",
            "localhost:7440",
            "127.0.0.1:1",
            "[::1]:7440",
            "mybox.lan",
            "MYBOX.LAN:9",
        ] {
            assert_eq!(status_of(&g, "GET", &[("host", host)]), 200, "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:7440",
            "7f000001.rbndr.us:7440",
            "10.0.0.1:7440",
            "localhost.evil.example",
        ] {
            assert_eq!(status_of(&g, "GET", &[("host", host)]), 421, "{host}");
        }
        assert_eq!(status_of(&g, "GET", &[]), 421);
    }

    #[test]
    fn an_unspecified_bind_accepts_ip_literals_but_not_names() {
        let g = guard("0.0.0.0:7440", &[], None);
        assert_eq!(status_of(&g, "GET", &[("host", "192.168.1.9:7440")]), 200);
        assert_eq!(status_of(&g, "GET", &[("host", "[fe80::1]:7440")]), 200);
        assert_eq!(status_of(&g, "GET", &[("host", "evil.example:7440")]), 421);
        let bound = guard("192.168.1.9:7440", &[], None);
        assert_eq!(status_of(&bound, "GET", &[("host", "192.168.1.9")]), 200);
        assert_eq!(status_of(&bound, "GET", &[("host", "192.168.1.10")]), 421);
    }

    #[test]
    fn a_foreign_origin_may_read_nothing_and_write_nothing() {
        let g = guard("127.0.0.1:7440", &[], None);
        let host = ("host", "127.0.0.1:7440");
        let post = |origin| status_of(&g, "POST", &[host, ("origin", origin)]);
        assert_eq!(post("http://localhost:7440"), 200);
        assert_eq!(post("http://127.0.0.1:3000"), 200);
        assert_eq!(post("http://evil.example"), 403);
        assert_eq!(post("null"), 403);
        assert_eq!(post("file://"), 403);
        assert_eq!(post("http://localhost/x"), 403);
        assert_eq!(
            status_of(&g, "POST", &[host]),
            200,
            "no Origin: not a browser"
        );
        // A GET cannot change anything, and the Host check already stops rebinding.
        assert_eq!(
            status_of(&g, "GET", &[host, ("origin", "http://evil.example")]),
            200
        );
    }

    #[test]
    fn a_key_covers_every_request() {
        let g = guard("127.0.0.1:7440", &[], Some("s3cret"));
        let host = ("host", "localhost");
        assert_eq!(status_of(&g, "GET", &[host]), 401);
        assert_eq!(
            status_of(&g, "GET", &[host, ("authorization", "Bearer wrong")]),
            401
        );
        assert_eq!(
            status_of(&g, "GET", &[host, ("authorization", "s3cret")]),
            401
        );
        assert_eq!(
            status_of(&g, "POST", &[host, ("authorization", "Bearer s3cret")]),
            200
        );
        let refused = g.check(&request("GET", &[host])).unwrap_err();
        let response = refusal("/v1/models", &refused);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn only_a_get_of_whoami_itself_goes_without_the_key() {
        let g = guard("127.0.0.1:7440", &[], Some("s3cret"));
        let at = |method: &str, uri: &str, host: &str| {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .header("host", host)
                .body(Body::empty())
                .unwrap();
            g.check(&request)
                .map_or_else(|e| e.status().as_u16(), |()| 200)
        };
        let whoami = format!("{WHOAMI_PATH}?challenge={}", "ab".repeat(32));
        assert_eq!(at("GET", &whoami, "localhost"), 200);
        assert_eq!(at("GET", WHOAMI_PATH, "localhost"), 200);
        // Not another method, another path that starts the same, or a foreign Host.
        for (method, uri) in [
            ("HEAD", WHOAMI_PATH),
            ("POST", WHOAMI_PATH),
            ("GET", "/v1/mesh/whoami/"),
            ("GET", "/v1/mesh/whoamix"),
            ("GET", "/v1/mesh/status"),
        ] {
            assert_eq!(at(method, uri, "localhost"), 401, "{method} {uri}");
        }
        assert_eq!(at("GET", &whoami, "evil.example"), 421);
    }

    #[tokio::test]
    async fn refusals_take_the_shape_of_the_api_they_were_for() {
        let g = guard("127.0.0.1:7440", &[], Some("s3cret"));
        let refused = g
            .check(&request("GET", &[("host", "127.0.0.1:7440")]))
            .unwrap_err();
        let body = |path: &'static str| {
            let refused = &refused;
            async move {
                let body = refusal(path, refused).into_body();
                let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
            }
        };
        let ollama = body("/api/tags").await;
        assert!(
            ollama["error"].as_str().unwrap().contains("API key"),
            "{ollama}"
        );
        let openai = body("/v1/models").await;
        assert_eq!(openai["error"]["code"], "invalid_api_key", "{openai}");
    }

    #[test]
    fn an_announced_body_over_the_cap_is_refused_before_it_is_read() {
        let g = guard("127.0.0.1:7440", &[], None);
        let host = ("host", "localhost");
        let over = (MAX_REQUEST_BODY + 1).to_string();
        assert_eq!(
            status_of(&g, "POST", &[host, ("content-length", &over)]),
            413
        );
        let at = MAX_REQUEST_BODY.to_string();
        assert_eq!(status_of(&g, "POST", &[host, ("content-length", &at)]), 200);
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_are_shed_with_a_json_503_until_a_body_ends() {
        let g = Arc::new(guard("127.0.0.1:7440", &[], None));
        let held: Vec<_> = (0..MAX_CONCURRENT_REQUESTS)
            .map(|_| g.permits.clone().try_acquire_owned().unwrap())
            .collect();
        let router = apply(
            Router::new().route("/x", axum::routing::get(|| async { "ok" })),
            g.clone(),
        );
        let call = || {
            let router = router.clone();
            async move {
                use tower_service::Service;
                let mut svc = router;
                svc.call(request("GET", &[("host", "localhost")]))
                    .await
                    .unwrap()
            }
        };
        // `request` targets /v1/mesh/status, which this router lacks: a 404 means "served".
        let shed = call().await;
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(shed.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "api_busy");
        drop(held);
        let served = call().await;
        assert_eq!(served.status(), StatusCode::NOT_FOUND);
        // A response not yet consumed holds its place; dropping it gives the place back.
        assert_eq!(g.permits.available_permits(), MAX_CONCURRENT_REQUESTS - 1);
        drop(served);
        assert_eq!(g.permits.available_permits(), MAX_CONCURRENT_REQUESTS);
    }
}
