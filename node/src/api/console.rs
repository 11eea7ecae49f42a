//! The web console at `/`: one page, its script and its style sheet, compiled into the binary
//! (no CDN, no build step). It reads everything from the API that serves it: status, peers and
//! models, the inspector's calls, and the live feed of `/v1/mesh/events`.
//!
//! `/` is also Ollama's liveness route: a request that does not ask for HTML (`Accept` without
//! `text/html`, as `curl` and Ollama's clients send) gets Ollama's answer, "Ollama is running".
//!
//! The assets hold no data, so they are served without the API key ([`PUBLIC_ASSETS`]); the
//! page asks for the key when the API refuses it. Every asset is sent with a strict
//! Content-Security-Policy (scripts and connections to this origin only, no framing), and
//! the script sets every text from the mesh as text, never as markup: a model name or an
//! answer from a hostile peer cannot run in the operator's browser.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The paths served without the API key (`GET` and `HEAD` only): the console's assets.
pub const PUBLIC_ASSETS: [&str; 3] = ["/", "/console.js", "/console.css"];

/// What every console asset is sent with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: the console for a browser, Ollama's liveness answer for anything else.
pub(super) async fn root(headers: HeaderMap) -> Response {
    let wants_html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    if wants_html {
        asset("text/html; charset=utf-8", INDEX_HTML)
    } else {
        crate::ollama::ROOT_ANSWER.into_response()
    }
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_browser_gets_the_console_and_a_client_gets_ollamas_answer() {
        let mut browser = HeaderMap::new();
        browser.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,*/*;q=0.8"),
        );
        let page = root(browser).await;
        let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"));
        let body = axum::body::to_bytes(page.into_body(), 1 << 20)
            .await
            .unwrap();
        assert!(std::str::from_utf8(&body).unwrap().contains("/console.js"));
        let plain = root(HeaderMap::new()).await;
        let body = axum::body::to_bytes(plain.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], crate::ollama::ROOT_ANSWER.as_bytes());
    }

    #[test]
    fn the_script_never_writes_markup() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!CONSOLE_JS.contains(banned), "console.js uses {banned}");
        }
        assert!(
            !INDEX_HTML.contains("<script>"),
            "no inline script (the CSP forbids it)"
        );
        assert!(
            !INDEX_HTML.contains("style="),
            "no inline style (the CSP forbids it)"
        );
    }
}
