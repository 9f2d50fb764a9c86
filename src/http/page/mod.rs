//! `GET /`: the status page, plain HTML, CSS and JavaScript embedded in the binary. It is
//! open (it holds no fleet data: it asks for the token and then reads the API like any
//! client) and loads nothing from elsewhere, which its Content-Security-Policy enforces.

use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::Body;

static PAGE: LazyLock<Bytes> = LazyLock::new(|| {
    let html = include_str!("index.html")
        .replacen("/*CSS*/", include_str!("page.css"), 1)
        .replacen("/*JS*/", include_str!("page.js"), 1);
    Bytes::from(html)
});

/// Everything from this origin only; inline style and script are the page's own (there is
/// no other page to inject into), and nothing of the fleet is ever written as HTML.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

pub(super) fn page() -> Response<Body> {
    let mut r = Response::new(Full::new(PAGE.clone()).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_whole_and_self_contained() {
        let page = std::str::from_utf8(&PAGE).unwrap();
        assert!(!page.contains("/*CSS*/") && !page.contains("/*JS*/"));
        assert!(page.contains("EventSource") && page.contains("--bg"));
        for outside in ["http://", "https://", "//cdn", "src=\""] {
            // The one namespace URI is an identifier, not a load.
            let hits = page.matches(outside).count();
            let allowed = usize::from(outside == "http://");
            assert!(hits <= allowed, "{outside} appears {hits} times");
        }
    }
}
