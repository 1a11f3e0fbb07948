//! Routing and auth: what each path answers, run on the handler threads for
//! requests tiny_http parsed (from the front's canonical request).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use log::{debug, error};

use super::Shared;
use crate::logging::escape;

/// Client-supplied text in logs is cut to this many bytes.
const LOG_CLIP: usize = 120;

/// One routed answer.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Option<(&'static str, &'static str)>,
}

impl Answer {
    fn text(status: u16, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            extra: None,
        }
    }
}

pub(super) fn handle(shared: &Shared, request: tiny_http::Request, body_hint: &mut usize) {
    let url = request.url();
    let path = url.split('?').next().unwrap_or("");
    let answer = route(shared, &request, path, body_hint);
    // The front checked both (a token, visible ASCII), but they are still the
    // client's choice: escaped and cut.
    let method = request.method().to_string();
    debug!(
        "metrics sidecar: {} {} -> {}",
        escape(method.as_bytes(), LOG_CLIP),
        escape(path.as_bytes(), LOG_CLIP),
        answer.status
    );
    // Never chunked: the length is known, and an HTTP/1.0 client (the front
    // always speaks HTTP/1.1 to tiny_http) could not read chunks.
    let mut response = tiny_http::Response::from_data(answer.body)
        .with_status_code(answer.status)
        .with_chunked_threshold(usize::MAX);
    let server = concat!("sockpool/", env!("CARGO_PKG_VERSION"));
    let headers = [
        Some(("Content-Type", answer.content_type)),
        Some(("Server", server)),
        answer.extra,
    ];
    for (name, value) in headers.into_iter().flatten() {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    if let Err(e) = request.respond(response) {
        debug!("metrics sidecar: response not delivered: {e}");
    }
}

fn route(shared: &Shared, request: &tiny_http::Request, path: &str, hint: &mut usize) -> Answer {
    use tiny_http::Method;
    if !matches!(request.method(), Method::Get | Method::Head) {
        let mut a = Answer::text(405, "method not allowed\n");
        a.extra = Some(("Allow", "GET, HEAD"));
        return a;
    }
    match path {
        "/metrics" => {
            if let Some(token) = &shared.token {
                if !authorized(request, token) {
                    let mut a = Answer::text(401, "unauthorized\n");
                    a.extra = Some(("WWW-Authenticate", "Bearer"));
                    return a;
                }
            }
            let mut body = String::with_capacity(*hint);
            let render = &shared.render;
            // The render closure is the server's code; a bug there must cost one
            // scrape, not the sidecar's handler thread.
            match panic::catch_unwind(AssertUnwindSafe(|| render(&mut body))) {
                Ok(()) => {
                    *hint = body.len().saturating_add(1024);
                    Answer {
                        status: 200,
                        content_type: crate::metrics::CONTENT_TYPE,
                        body: body.into_bytes(),
                        extra: None,
                    }
                }
                Err(_) => {
                    error!("metrics sidecar: rendering the metrics panicked");
                    Answer::text(500, "internal error\n")
                }
            }
        }
        "/-/healthy" => Answer::text(200, "sockpool is healthy.\n"),
        "/-/ready" => {
            if shared.ready.load(Ordering::SeqCst) {
                Answer::text(200, "sockpool is ready.\n")
            } else {
                Answer::text(503, "sockpool is not ready (draining).\n")
            }
        }
        "/" => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: index_page().into_bytes(),
            extra: None,
        },
        _ => Answer::text(404, "not found\n"),
    }
}

fn index_page() -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>sockpool</title></head>\n\
         <body><h1>sockpool</h1><p>version {}</p><ul>\n\
         <li><a href=\"/metrics\">/metrics</a></li>\n\
         <li><a href=\"/-/healthy\">/-/healthy</a></li>\n\
         <li><a href=\"/-/ready\">/-/ready</a></li>\n\
         </ul></body></html>\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// `Authorization: Bearer <token>`, the scheme case-insensitive (RFC 6750).
fn authorized(request: &tiny_http::Request, token: &[u8]) -> bool {
    let Some(header) = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
    else {
        return false;
    };
    let value = header.value.as_str().trim();
    let Some((scheme, presented)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(token, presented.trim().as_bytes())
}

/// Compares without an early exit: the time depends on `expected.len()` only,
/// never on where the bytes differ or on the presented length.
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, &e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!e);
        diff |= e ^ p;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
        // A presented byte equal to `!e` past the end must not make it match.
        assert!(!constant_time_eq(b"ab", b"a"));
    }
}
